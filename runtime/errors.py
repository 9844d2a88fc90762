"""Exceptions raised by svda.runtime. Each message says what was wrong and what to do."""


class SvdaError(Exception):
    """Base class of every error svda raises on purpose."""


class BaseModelError(SvdaError):
    """A base model could not be found, read or used."""


class AdapterConfigError(SvdaError, ValueError):
    """An adapter configuration is invalid (bad rank, unknown target, ...)."""


class AdapterStateError(SvdaError, RuntimeError):
    """An operation does not fit the current adapter state (e.g. mixing rows while merged)."""
