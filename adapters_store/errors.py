"""Errors of the adapter format, one per load check (in the order the checks run)."""

from svda.runtime.errors import SvdaError


class AdapterFormatError(SvdaError, ValueError):
    """A ``.svda`` file could not be loaded; subclasses say which check failed."""

    check = "file"


class UnreadableAdapterFile(AdapterFormatError):
    check = "readable"


class AdapterMetadataError(AdapterFormatError):
    check = "metadata"


class HeaderHashMismatch(AdapterMetadataError):
    """The header's semantic fields do not match its content hash (``svda.content_sha256``)."""


class UnsupportedFormatVersion(AdapterMetadataError):
    check = "format-version"


class PayloadError(AdapterFormatError):
    """Tensors missing, extra, of the wrong dtype or shape, or not finite."""

    check = "payload"


class PayloadHashMismatch(AdapterFormatError):
    check = "payload-hash"


class LayerShapeMismatch(AdapterFormatError):
    check = "shapes"


class BaseMismatch(AdapterFormatError):
    check = "base-fingerprint"


class RegenerationMismatch(AdapterFormatError):
    check = "regeneration-probe"
