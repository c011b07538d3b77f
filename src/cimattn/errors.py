"""The one exception type users see: a bad input, named, with how to fix it."""


class CimattnError(Exception):
    """Bad input or an unsupported request.

    The CLI prints its message as one line on stderr and exits with code 2;
    everything else (a bug) keeps its traceback.
    """
