"""The one error type users see: what was wrong and what to do, printed without a traceback."""


class UserError(ValueError):
    """Bad input from the user (arguments, files, models). The CLI prints it on one line and exits with 2."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message (or its type's name), for a one-line report."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def check_loaded(model: object) -> None:
    """Refuse anything but a loaded torch module (a name or a folder, say) in one line."""
    from torch import nn

    if not isinstance(model, nn.Module):
        raise UserError(f"model must be a loaded torch module, got {type(model).__name__}: load it first")


def check_given(*arguments: tuple[object, type, str]) -> None:
    """:func:`check_instance` of each ``(value, kind, name)`` whose value is given (not None)."""
    for value, kind, name in arguments:
        if value is not None:
            check_instance(value, kind, name)


def check_instance(value: object, kind: type, name: str) -> None:
    """Refuse a ``value`` for the argument ``name`` that is not a ``kind`` (a dict for a settings
    dataclass, say) in one line, instead of an AttributeError deep inside."""
    if not isinstance(value, kind):
        raise UserError(f"{name} must be a {kind.__name__}, got {type(value).__name__}")
