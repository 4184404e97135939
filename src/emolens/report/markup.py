"""HTML fragments shared by the report's page and its verdict sentences."""

import html


def escape(value) -> str:
    """``value`` as text safe inside HTML (quotes escaped too)."""
    return html.escape(str(value), quote=True)


def note(text: str, problem: bool = False) -> str:
    """A paragraph of the report's note style (``problem``: the warning style)."""
    return f'<p class="{"problem" if problem else "note"}">{escape(text)}</p>'


def names(items) -> str:
    """Comma-separated ``items``, or ``"none"``."""
    items = list(items)
    return ", ".join(items) if items else "none"
