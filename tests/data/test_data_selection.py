"""Prompts, classes, per-class selection and patient-level splits."""
import pytest

from medjax.data import Record, default_config, make_prompt, phantom_index, select_records
from medjax.data import selection, splits
from medjax.errors import MedjaxError


def record(key, patient, class_index=-1, **labels):
  return Record(key=key, patient_id=patient, kind="file", modality="chest x-ray",
                labels={k.replace("_", " "): v for k, v in labels.items()},
                class_index=class_index)


def test_prompts_from_config():
  config = default_config().prompt
  effusion = record("a", "p1", class_index=0, Pleural_Effusion=1.0, Cardiomegaly=1.0)
  clear = record("b", "p2", class_index=1, No_Finding=1.0, Pleural_Effusion=0.0)
  assert make_prompt(effusion, config) == "a chest x-ray with pleural effusion, cardiomegaly"
  assert make_prompt(clear, config) == "a chest x-ray with no finding"
  config.kind = "class"
  names = ("pleural_effusion", "no_finding")
  assert make_prompt(effusion, config, names) == "a chest x-ray with pleural effusion"
  assert make_prompt(clear, config, names) == "no finding"
  assert make_prompt(effusion, config, ("edema_like", "x")) == "a chest x-ray with edema like"
  config.kind = "token"
  assert make_prompt(effusion, config) == "a photo of a <lungxray>"
  config.token, config.token_template = "<effusion>", "a {modality} with {token}"
  assert make_prompt(effusion, config) == "a chest x-ray with <effusion>"


def test_prompts_from_report_sections():
  config = default_config().prompt
  config.kind = "report"
  with_report = Record(key="a", patient_id="p", kind="file", modality="chest x-ray",
                       labels={"Pleural Effusion": 1.0},
                       report={"findings": "Fluid at the right base.", "impression": "Effusion."})
  assert make_prompt(with_report, config) == "Effusion."
  config.report_section = "findings+impression"
  assert make_prompt(with_report, config) == "Fluid at the right base. Effusion."
  config.max_words = 3
  assert make_prompt(with_report, config) == "Fluid at the"
  without = Record(key="b", patient_id="p", kind="file", modality="chest x-ray",
                   labels={"Pleural Effusion": 1.0})
  assert make_prompt(without, config) == "a chest x-ray with pleural effusion"


def test_bad_prompt_template_is_caught_early():
  config = default_config()
  config.prompt.labels_template = "a {modalty} with {labels}"
  config.phantoms.num = 20
  with pytest.raises(MedjaxError, match=r"labels_template.*unknown field\(s\) \['modalty'\]"):
    from medjax.data import make_dataset  # pylint: disable=import-outside-toplevel
    make_dataset(config, "train", 2, resolution=16, process_index=0, process_count=1)


def test_class_parsing_and_assignment():
  classes = selection.parse_classes((("pleural_effusion", {"Pleural Effusion": 1}),
                                     ("no_finding", {"No Finding": 1, "Pleural Effusion": 0})))
  assert classes == [("pleural_effusion", [("Pleural Effusion", 1.0)]),
                     ("no_finding", [("No Finding", 1.0), ("Pleural Effusion", 0.0)])]
  assert selection.parse_classes({"a": {"X": 1}}) == [("a", [("X", 1.0)])]
  assert selection.parse_classes([["a", {"X": 1.0}]]) == [("a", [("X", 1.0)])]  # from JSON
  records = [record("1", "p", Pleural_Effusion=1.0), record("2", "p", No_Finding=1.0),
             record("3", "p", No_Finding=1.0, Pleural_Effusion=0.0), record("4", "p")]
  assigned = selection.assign_classes(records, classes, ("Pleural Effusion", "No Finding"))
  assert [(r.key, r.class_index) for r in assigned] == [("1", 0), ("3", 1)]
  with pytest.raises(MedjaxError, match="unknown label 'Effusion'"):
    selection.assign_classes(records, selection.parse_classes((("a", {"Effusion": 1}),)),
                             ("No Finding",))
  with pytest.raises(MedjaxError, match="condition 'Effusion': 2 should be 1 or 0"):
    selection.parse_classes((("a", {"Effusion": 2}),))
  with pytest.raises(MedjaxError, match="class 'a' needs its conditions as"):
    selection.parse_classes((("a", "Effusion=1"),))
  with pytest.raises(MedjaxError, match="duplicate class names"):
    selection.parse_classes((("a", {"X": 1}), ("a", {"X": 0})))
  with pytest.raises(MedjaxError, match=r"give \(name, \{'Label': 1 or 0\}\) pairs"):
    selection.parse_classes("a: Effusion=1")


def _patients(records):
  return {r.patient_id for r in records}


def test_random_split_is_patient_level_and_stable():
  records = [record(f"{p}/{i}", f"p{p}") for p in range(50) for i in range(1 + p % 3)]
  parts = {s: splits.split_records(records, s, fractions=(0.6, 0.2, 0.2), seed=1)
           for s in splits.SPLITS}
  assert sum(len(v) for v in parts.values()) == len(records)
  for a in splits.SPLITS:
    for b in splits.SPLITS:
      if a < b:
        assert not _patients(parts[a]) & _patients(parts[b])
  assert abs(len(parts["train"]) - 0.6 * len(records)) <= 3
  assert splits.split_records(records, "test", fractions=(0.6, 0.2, 0.2), seed=1) == parts["test"]
  assert splits.split_records(records, "test", fractions=(0.6, 0.2, 0.2), seed=2) != parts["test"]


def test_sizes_split_balanced_per_class():
  records = [record(f"{p}/{i}", f"p{p}", class_index=p % 2) for p in range(40) for i in range(2)]
  names = ("effusion", "clear")
  parts = {s: splits.split_by_sizes(records, s, (10, 6, 6), 0, names) for s in splits.SPLITS}
  for split, size in zip(splits.SPLITS, (10, 6, 6)):
    assert len(parts[split]) == size
    assert sum(r.class_index == 0 for r in parts[split]) == size // 2
  assert not _patients(parts["train"]) & _patients(parts["val"])
  assert not _patients(parts["val"]) & _patients(parts["test"])
  with pytest.raises(MedjaxError, match="not enough patients left"):
    splits.split_by_sizes(records, "test", (60, 10, 30), 0, names)


def test_per_class_selection_and_paper_a_config():
  config = default_config()
  config.phantoms.num = 400
  config.classes = (("pleural_effusion", {"Pleural Effusion": 1}),
                    ("no_finding", {"No Finding": 1}))
  config.per_class = 30
  train = select_records(config, "train")
  assert train.class_names == ("pleural_effusion", "no_finding")
  assert [r.class_index for r in train.records].count(0) == 30
  assert len(train.records) == 60
  assert select_records(config, "train").records == train.records  # stable
  config.split.mode, config.split.sizes = "sizes", (40, 20, 20)
  with pytest.raises(MedjaxError, match="'pleural_effusion' has 20 images, fewer than per_class"):
    select_records(config, "train")
  config.per_class = 15
  parts = {s: select_records(config, s).records for s in splits.SPLITS}
  assert [len(parts[s]) for s in splits.SPLITS] == [30, 20, 20]  # per_class caps train only
  assert sum(r.class_index == 1 for r in parts["test"]) == 10
  config.per_class_splits = ("train,val",)  # a comma list is not two split names
  with pytest.raises(MedjaxError, match=r"per_class_splits=\('train,val',\): expected a tuple"):
    select_records(config, "train")


def test_empty_selection_and_source_split_errors(chexpert_root):
  config = default_config()
  config.phantoms.num = 10
  config.classes = (("none", {"Fracture": 1}),)
  with pytest.raises(MedjaxError, match="no images match the filters and classes"):
    select_records(config, "train")
  config.classes = ()
  config.split.mode = "source"
  with pytest.raises(MedjaxError, match="defines no splits"):
    select_records(config, "train")
  config.source, config.root = "chexpert", str(chexpert_root)
  assert len(select_records(config, "val").records) == 2
  with pytest.raises(MedjaxError, match="no test split .* set config.data.split.source_test='val'"):
    select_records(config, "test")
  config.chexpert.views = ("LL",)
  with pytest.raises(MedjaxError, match="no images match"):
    select_records(config, "train")


def test_phantom_index_labels():
  index = phantom_index("mri", 20, seed=3, lesion_fraction=0.5)
  assert index.label_names == ("csPCa",)
  assert {r.labels["csPCa"] for r in index.records} == {0.0, 1.0}


def test_phantom_index_cxr_and_mri():
  """'cxr+mri': the two modalities alternate under one label set; classes pick them apart."""
  index = phantom_index("cxr+mri", 40, seed=7)
  kinds = [r.kind for r in index.records]
  assert kinds[:4] == ["phantom_cxr", "phantom_mri", "phantom_cxr", "phantom_mri"]
  assert index.label_names[-1] == "csPCa" and "Pleural Effusion" in index.label_names
  assert len({r.patient_id for r in index.records}) == 40
  config = default_config()
  config.phantoms.kind, config.phantoms.num, config.phantoms.seed = "cxr+mri", 40, 7
  config.split.fractions = (1.0, 0.0, 0.0)
  config.classes = (("effusion", {"Pleural Effusion": 1}), ("diseased", {"csPCa": 1}),
                    ("healthy", {"csPCa": 0}))
  records = select_records(config, "train").records
  by_class = {k: {r.kind for r in records if r.class_index == k} for k in range(3)}
  assert by_class == {0: {"phantom_cxr"}, 1: {"phantom_mri"}, 2: {"phantom_mri"}}
  with pytest.raises(MedjaxError, match="phantoms.kind='ct'"):
    phantom_index("ct", 4)
