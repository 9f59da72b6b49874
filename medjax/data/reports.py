"""Radiology report section extraction (MIMIC-CXR style `FINDINGS:` / `IMPRESSION:` headers)."""
import re

# A header is an upper-case phrase at the start of a line followed by a colon.
_HEADER = re.compile(r"^[ \t]*([A-Z][A-Z &/,()-]{2,60}?)[ \t]*:", re.MULTILINE)


def extract_sections(text: str) -> dict[str, str]:
  """Splits a report into lower-case section name -> whitespace-normalised text.

  'FINDINGS AND IMPRESSION:' fills both 'findings' and 'impression'. Text before the first
  header is kept under 'preamble'. Empty sections are dropped.
  """
  sections: dict[str, str] = {}
  matches = list(_HEADER.finditer(text))
  starts = [m.start() for m in matches] + [len(text)]
  preamble = " ".join(text[:starts[0]].split())
  if preamble:
    sections["preamble"] = preamble
  for match, end in zip(matches, starts[1:], strict=True):
    name = " ".join(match.group(1).lower().split())
    body = " ".join(text[match.end():end].split())
    if not body:
      continue
    names = [name]
    if "findings" in name and "impression" in name:
      names = ["findings", "impression"]
    for key in names:
      sections[key] = f"{sections[key]} {body}" if key in sections else body
  return sections
