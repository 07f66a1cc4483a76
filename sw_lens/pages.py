"""HTML pages that open offline and that no string from a file can turn into markup.

Everything a page shows comes from files we do not control: token strings from a
downloaded tokenizer, prompts and model names from a results file. Each string is
escaped for the context it lands in: `text` for element content and attributes,
`script_json` for data inside a ``<script>`` element, where HTML escaping does not apply
and a token such as ``</script><img onerror=...>`` would otherwise end the script, and
both for tokens that circuitsvis itself writes into the page as HTML.

circuitsvis elements are rendered here rather than with circuitsvis's own `render`:
that embeds its props with a bare ``json.dumps``, which a token containing
``</script>`` breaks out of. We inline the same bundled JavaScript (no CDN, so pages
open offline) and pass the props through `script_json`.
"""

import html
import json
import re
from pathlib import Path

import circuitsvis
from pydantic import BaseModel

_BUNDLE = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
# In JSON, "\u003c" is "<": the parser sees the same string, the HTML tokenizer sees no
# tag. U+2028/2029 end a line in older JavaScript parsers.
_SCRIPT_ESCAPES = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}


def text(value) -> str:
    """A string for element content or a quoted attribute value."""
    return html.escape(str(value), quote=True)


def _plain(value):
    """A results document's part (`sw_lens.documents`) as the JSON it was read from."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", exclude_unset=True)
    raise TypeError(f"{type(value).__name__} is not JSON")


def script_json(data) -> str:
    """JSON that is inert inside any ``<script>`` element: no ``<`` (so no ``</script>``
    or ``<!--``) and no ``&`` reaches the HTML tokenizer."""
    encoded = json.dumps(data, allow_nan=False, default=_plain)
    return "".join(_SCRIPT_ESCAPES.get(ch, ch) for ch in encoded)


def _bundle() -> str:
    """circuitsvis's bundled JavaScript, safe to inline: its one ``</script>`` sits in a
    string literal (React's ``innerHTML = "<script></script>"``), where ``<\\/`` means
    the same to JavaScript and ends nothing for the HTML tokenizer."""
    js = _BUNDLE.read_text(encoding="utf-8")
    return re.sub(r"</(script)", r"<\\/\1", js, flags=re.IGNORECASE)


def circuitsvis_elements(elements: list[tuple[str, str, list[str], dict]]) -> str:
    """circuitsvis React components (``ColoredTokens``, ``AttentionHeads``, ...), each
    ``(element id, component, tokens, props)``, rendered into their divs by one script
    that inlines the JavaScript once; place the divs with `element_div`.

    circuitsvis puts token strings into the page as HTML (``dangerouslySetInnerHTML``,
    after turning whitespace into ``&nbsp;``), so they are HTML-escaped here: a token
    ``<img src=x onerror=...>`` is shown as those characters, never made an element."""
    renders = []
    for element_id, component, tokens, props in elements:
        if not element_id.replace("-", "").isalnum() or not component.isalnum():
            raise ValueError(
                f"not a safe element id / component name: {element_id!r}, {component!r}"
            )
        props = {"tokens": [text(t) for t in tokens]} | props
        renders.append(
            f'CircuitsVis.render("{element_id}", CircuitsVis.{component}, {script_json(props)});'
        )
    calls = "\n".join(renders)
    return f'<script crossorigin type="module">\n{_bundle()}\n{calls}\n</script>'


def element_div(element_id: str) -> str:
    return f'<div id="{text(element_id)}" style="margin: 15px 0;"></div>'


def circuitsvis_element(element_id: str, component: str, tokens: list[str], **props) -> str:
    """One circuitsvis component with its div (see `circuitsvis_elements`)."""
    return (
        element_div(element_id)
        + "\n"
        + circuitsvis_elements([(element_id, component, tokens, props)])
    )


def json_data(element_id: str, data) -> str:
    """Machine-readable data in the page (``type="application/json"``, never executed)."""
    return f'<script type="application/json" id="{text(element_id)}">{script_json(data)}</script>'


def page(title: str, body: str) -> str:
    """A whole document; `title` is escaped here, `body` must be built from `text` and
    the functions above."""
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{text(title)}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}
table{{border-collapse:collapse}}td,th{{padding:0.2em 0.8em;border-bottom:1px solid #ddd}}</style>
</head><body>
{body}
</body></html>
"""
