"""User-facing errors: raised for bad input, printed as one paragraph by the entry points."""


class ZooError(Exception):
    """An error caused by the user's input (config, files, arguments) or the job's
    surroundings (servers, signals), not by a bug. The entry points print it as one
    paragraph and exit with ``exit_code``."""

    exit_code = 2


class ConfigError(ZooError):
    """A bad config key or value."""


class DataError(ZooError):
    """A missing, malformed or unsafe data file."""


class TrackingError(ZooError):
    """The tracking store or server cannot be used (unreachable, unwritable)."""


class TrackingUndelivered(TrackingError):
    """The job finished, but the tracking server did not answer: records are queued on disk."""

    exit_code = 3


def one_line(text: object) -> str:
    """Join a multi-line message (e.g. Hydra's InstantiationException) into one line."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def causes(exc: BaseException | None):
    """``exc`` and the exceptions it was raised from or during, outermost first."""
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


def redact_url(url: str) -> str:
    """A database or server URL without its password, for messages and files."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy can parse: keep only what follows the credentials
        return url.rsplit("@", 1)[-1]
