"""HTML pages: no string from a tokenizer or a results file becomes markup or script,
proved by parsing the page and by opening it in a real browser."""

import json
from html.parser import HTMLParser

import torch
from browser import open_page
from conftest import ONE, VOCAB, byte_tokenizer, hf_config, plant, run_experiment
from hypothesis import given
from hypothesis import strategies as st
from transformers import LlamaForCausalLM

from sw_lens import pages

# Ends the script element, injects an element with a handler, and starts a new script.
# No spaces: circuitsvis turns whitespace into &nbsp;, which would defuse a tag by itself.
PAYLOAD = (
    "</script><img/src=x/onerror=document.body.dataset.pwned=1>"
    "<script>document.body.dataset.pwned2=1</script><!--"
)
PAGE_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "p", "div", "script"}
PAGE_TAGS |= {"h2", "table", "tr", "th", "td"}


class Tags(HTMLParser):
    """Every start tag, as a browser's tokenizer sees the page."""

    def __init__(self, text: str):
        super().__init__()
        self.tags = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)


@given(st.text())
def test_script_json_is_the_same_data_and_has_no_markup(value):
    encoded = pages.script_json({"token": value, "list": [value]})
    assert json.loads(encoded) == {"token": value, "list": [value]}
    assert not {"<", ">", "&", "\u2028", "\u2029"} & set(encoded)


def hostile_model(path):
    """A tiny Llama whose tokenizer has one token whose text is `PAYLOAD` (an added token,
    as a downloaded tokenizer.json can declare), inside the model's vocabulary."""
    config = hf_config("llama")
    config.vocab_size = VOCAB + 1
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    plant(model, "llama", [ONE])
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    spec = json.loads((path / "tokenizer.json").read_text())
    spec["added_tokens"].append(
        {
            "id": VOCAB,
            "content": PAYLOAD,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": False,
        }
    )
    (path / "tokenizer.json").write_text(json.dumps(spec))
    return path


def assert_inert(page):
    """Parsed: only the page's own elements and its two scripts. In a browser: no script
    of the payload ran, the tokens were rendered as text, and the console is silent."""
    text = page.read_text()
    tags = Tags(text).tags
    assert set(tags) <= PAGE_TAGS, set(tags) - PAGE_TAGS
    assert tags.count("script") == 2  # circuitsvis's module and our JSON data
    dom, console = open_page(page)
    assert "pwned" not in dom.split("<body", 1)[1].split(">", 1)[0]  # no attribute was set
    assert "img" not in Tags(dom).tags  # no element was injected
    assert "&lt;/script&gt;&lt;img/src=x/onerror=" in dom  # the token is there, as text
    assert console == []


def test_a_hostile_token_stays_text_from_locate_and_from_figures(tmp_path):
    model = hostile_model(tmp_path / "tiny<img src=x onerror=alert(1)>")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(f"words A and {PAYLOAD} more words, A again. " * 12)
    out = tmp_path / "out"
    done = run_experiment(
        "locate.py",
        *("--model", model, "--text", corpus, "--prompt", f"xyz A {PAYLOAD}"),
        *("--window", "64", "--max-tokens", "256", "--rank-tokens", "128", "--device", "cpu"),
        *("--min-ppl-ratio", "0", "--find", "rule", "--out", out),
    )
    assert done.returncode == 0, done.stderr
    document = json.loads((out / "results.json").read_text())
    assert PAYLOAD in document["token_loss"]["tokens"]
    assert_inert(out / "token_loss.html")

    # The same page redrawn from a results file whose every string is hostile.
    document["model"]["name"] = PAYLOAD
    document["token_loss"]["label"] = PAYLOAD
    document["perplexity"]["baseline"]["corpus"] = PAYLOAD
    document["perplexity"]["baseline"]["protocol_description"] = PAYLOAD
    document["predictions"]["prompt"] = PAYLOAD
    document["predictions"]["before"][0]["token"] = PAYLOAD
    redrawn = tmp_path / "redrawn"
    redrawn.mkdir()
    (redrawn / "results.json").write_text(json.dumps(document))
    done = run_experiment("figures.py", redrawn / "results.json")
    assert done.returncode == 0, done.stderr
    assert_inert(redrawn / "token_loss.html")
