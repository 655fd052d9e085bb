"""The transport-free error types of the service: one class per case of DESIGN.md's error table."""

from __future__ import annotations


class ServiceError(Exception):
    """Base of every error a caller may see; `code` is stable and machine-readable."""

    code = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidImage(ServiceError):
    """The bytes are not a decodable image (empty, text, corrupt, truncated)."""

    code = "invalid_image"


class UnsupportedMediaType(ServiceError):
    """The request declares a content type that is not an image we accept."""

    code = "unsupported_media_type"


class ImageTooLarge(ServiceError):
    """Too many bytes, or too many pixels declared in the image header."""

    code = "image_too_large"


class InvalidArgument(ServiceError):
    """A request parameter is out of range (top_k, timeout) or a required part is missing."""

    code = "invalid_argument"


class BodyTimeout(ServiceError):
    """The request body did not arrive before the request's deadline (a slow or stalled sender)."""

    code = "request_timeout"


class Overloaded(ServiceError):
    """The batch queue is full: load is being shed, retry shortly."""

    code = "overloaded"


class DeadlineExceeded(ServiceError):
    """The request's deadline passed before its image was computed."""

    code = "deadline_exceeded"


class NotReady(ServiceError):
    """The model is still warming up, or the server is draining for shutdown."""

    code = "not_ready"
