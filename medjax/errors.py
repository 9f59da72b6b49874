"""One exception type for bad input, so entry points can print a single clear line."""


class MedjaxError(ValueError):
  """Bad user input: a file, key or value that is not what medjax expected.

  The message names the file or key and what was expected; entry points print it as one line.
  """
