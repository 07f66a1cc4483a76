"""Each option is declared once: the command line and sweep files take the same values,
refuse the same values with the same words, and a sweep file's options become the
command-line words that give the command the same configuration."""

import argparse

import pydantic
import pytest

from sw_lens.errors import SwLensError
from sw_lens.locate import Criterion
from sw_lens.options import (
    FiniteList,
    PositiveInt,
    add_options,
    check_table,
    from_args,
    option,
    options_of,
    to_argv,
)
from sw_lens.search import SearchParameters
from sw_lens.setup import JOB, LocateConfig
from sw_lens.vocabulary import WeightCoord


class Refused(Exception):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise Refused(message)


def parse(cls, argv, names=None):
    p = Parser()
    add_options(p, cls, names)
    return from_args(cls, p.parse_args(argv))


SWEEP = {
    "model": "gpt2",
    "prompt": ["one", "two"],
    "window": 64,
    "threshold": 12,  # an integer is a number
    "min_ppl_ratio": 1.5,
    "find": "rule",
    "search_k": 3,
    "weight": ["2,507,90", [11, 507, 1229]],
    "trust_remote_code": True,
    "stride": 32,
}


def test_a_sweep_files_options_give_the_command_the_same_configuration():
    options = options_of(LocateConfig, JOB)
    checked = check_table(options, SWEEP, "sweep")
    config = parse(LocateConfig, to_argv(options, checked), JOB)
    assert config.prompts == ["one", "two"] and config.window == 64 and config.stride == 32
    assert config.criterion == Criterion(min_abs=12.0, min_ratio=10.0, min_ppl_ratio=1.5)
    assert config.search == SearchParameters(search_k=3)
    assert config.weights == [WeightCoord(2, 507, 90), WeightCoord(11, 507, 1229)]
    assert config.find == "rule" and config.trust_remote_code
    assert parse(LocateConfig, []) == LocateConfig()  # every default is the dataclass's


@pytest.mark.parametrize(
    ("key", "text", "value", "message"),
    [
        ("window", "0", 0, "must be a positive integer, got 0"),
        ("threshold", "nan", float("nan"), "must be a finite number, got nan"),
        ("min_ratio", "inf", float("inf"), "must be a finite number, got inf"),
        ("seed", "-1", -1, "must be a non-negative integer <= 4294967295, got -1"),
        ("prompt", "a\nb", "a\nb", "contains a newline or control character"),
        ("weight", "1,2", ["1,2"], "expected LAYER,ROW,COL non-negative integers"),
        ("negligible", "0", 0, "must be a positive number, got 0"),
    ],
)
def test_the_command_line_and_a_sweep_file_refuse_alike(key, text, value, message):
    with pytest.raises(Refused, match=f"argument --{key.replace('_', '-')}: {message}"):
        parse(LocateConfig, [f"--{key.replace('_', '-')}={text}"])
    with pytest.raises(SwLensError, match=f"sweep: '{key}' {message}"):
        check_table(options_of(LocateConfig, JOB), {key: value}, "sweep")


def test_a_sweep_file_is_typed_as_toml_is():
    options = options_of(LocateConfig, JOB)
    for key, value in (("window", "64"), ("window", True), ("model", 3), ("prompt", [1])):
        with pytest.raises(SwLensError, match=f"sweep: '{key}' must be"):
            check_table(options, {key: value}, "sweep")


def test_a_new_option_is_one_declaration():
    """What adding an option to a command is: one field; the parser, the sweep check and
    the configuration follow."""

    @pydantic.dataclasses.dataclass
    class Options:
        n_heads: PositiveInt = option(4, "heads to patch")
        factors: FiniteList = option([0.5, 2.0], "comma-separated")

    assert parse(Options, ["--n-heads", "7", "--factors", "1,3"]) == Options(7, [1.0, 3.0])
    assert check_table(options_of(Options), {"n_heads": 2}, "sweep") == {"n_heads": 2}
    with pytest.raises(Refused, match="argument --factors: must be a finite number"):
        parse(Options, ["--factors", "1,nan"])
