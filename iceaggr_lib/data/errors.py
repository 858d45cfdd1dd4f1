"""The one exception the data layer raises for bad input: it names the file and the problem."""


class DataFormatError(ValueError):
    """A data file is missing, malformed or inconsistent; the message names the file and what is wrong."""
