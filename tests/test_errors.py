"""The RuvLLM error hierarchy: 15 variants, each message led by the variant's text."""

from __future__ import annotations

import pytest

import ruvllm_jax
from ruvllm_jax import errors as E

PREFIXES = {
    "StorageError": "Storage error",
    "SessionError": "Session error",
    "KvCacheError": "KV cache error",
    "PagedAttentionError": "Paged attention error",
    "AdapterError": "Adapter error",
    "SonaError": "SONA error",
    "ConfigError": "Configuration error",
    "OutOfMemoryError": "Out of memory",
    "InvalidOperationError": "Invalid operation",
    "NotFoundError": "Not found",
    "BackendError": "Backend error",
    "ModelError": "Model error",
    "TokenizationError": "Tokenization error",
    "GenerationError": "Generation error",
    "RuvIoError": "IO error",
}


def test_there_are_fifteen_distinct_variants():
    assert len(E.ALL_ERRORS) == 15 == len(set(E.ALL_ERRORS))
    assert sorted(cls.__name__ for cls in E.ALL_ERRORS) == sorted(PREFIXES)


@pytest.mark.parametrize("name", sorted(PREFIXES))
def test_message_starts_with_the_variant_text(name):
    cls = getattr(ruvllm_jax, name)  # exported at the top level
    assert cls is getattr(E, name)
    err = cls("value 42 is wrong")
    assert str(err) == f"{PREFIXES[name]}: value 42 is wrong"
    assert err.message == "value 42 is wrong"
    assert isinstance(err, ruvllm_jax.RuvLLMError) and isinstance(err, Exception)
    with pytest.raises(ruvllm_jax.RuvLLMError, match="^" + PREFIXES[name]):
        raise err


def test_variants_are_not_each_other():
    for a in E.ALL_ERRORS:
        for b in E.ALL_ERRORS:
            assert issubclass(a, b) == (a is b)


def test_io_error_is_also_an_oserror():
    err = E.RuvIoError("cannot read /tmp/x")
    assert isinstance(err, OSError)
    assert str(err) == "IO error: cannot read /tmp/x"
    with pytest.raises(OSError):
        raise err
    assert not issubclass(E.ModelError, OSError)


def test_errors_pickle_and_keep_their_message():
    import pickle

    for cls in E.ALL_ERRORS:
        err = pickle.loads(pickle.dumps(cls("cache full at 4096")))
        assert type(err) is cls
        assert str(err) == f"{PREFIXES[cls.__name__]}: cache full at 4096"  # prefix not doubled
        assert err.message == "cache full at 4096"


def test_each_variant_is_a_plain_class_with_a_docstring_and_prefix():
    import inspect

    for cls in E.ALL_ERRORS:
        assert cls.__module__ == E.__name__
        assert inspect.getsource(cls).startswith(f"class {cls.__name__}(RuvLLMError")  # not made by a factory
        assert cls.__doc__.startswith("Raised ")  # says when it is raised
        assert vars(cls)["prefix"] == PREFIXES[cls.__name__]  # its own class attribute


def test_the_error_table_lists_every_variant():
    import pathlib

    table = (pathlib.Path(__file__).parents[1] / "docs" / "errors.md").read_text()
    rows = {line.split("|")[1].strip().strip("`") for line in table.splitlines() if line.startswith("| `")}
    assert rows == set(PREFIXES)
    for name, prefix in PREFIXES.items():  # each example that is given starts with its variant's text
        row = next(line for line in table.splitlines() if line.startswith(f"| `{name}`"))
        example = row.split("|")[3]
        assert "nothing yet" in row or f"`{prefix}: " in example, name
