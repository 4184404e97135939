"""Hub models pinned to a revision (``org/name@revision`` or ``--revision``): the revision
reaches every ``from_pretrained`` and the bridge, and is recorded. Offline: the hub is faked."""

import pytest
import torch

from emolens.cli import parse_args
from emolens.model import loading
from emolens.model.loading import split_revision, with_revision

REPO = "some-org/some-model"


def test_split_and_pin_revisions():
    assert split_revision(f"{REPO}@v1.0") == (REPO, "v1.0")
    assert split_revision(f"{REPO}@refs/pr/3") == (REPO, "refs/pr/3")
    assert split_revision(REPO) == (REPO, None)
    assert split_revision("/abs/folder@x") == ("/abs/folder@x", None)
    assert with_revision(REPO, "abc123") == f"{REPO}@abc123"
    assert with_revision(REPO, None) == REPO
    assert with_revision(f"{REPO}@abc123", "abc123") == f"{REPO}@abc123"
    with pytest.raises(ValueError, match="give one"):
        with_revision(f"{REPO}@main", "abc123")
    for spec in ("tiny-random", "gemma-3-270m", "model.gguf", "./run"):
        with pytest.raises(ValueError, match="applies to a hub id"):
            with_revision(spec, "abc123")
    assert loading.resolve_model_dir(f"{REPO}@abc123") == f"{REPO}@abc123"


def test_an_existing_local_folder_named_like_a_pinned_id_is_a_folder(tmp_path, monkeypatch):
    (tmp_path / "org" / "name@rev").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert split_revision("org/name@rev") == ("org/name@rev", None)


class _Tokenizer:
    pad_token_id = 0


def _record_from_pretrained(monkeypatch, cls, result):
    calls = []

    def fake(name, *args, **kwargs):
        calls.append((name, kwargs.get("revision")))
        return result

    monkeypatch.setattr(cls, "from_pretrained", fake)
    return calls


def test_revision_reaches_the_model_and_tokenizer_from_pretrained(monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_calls = _record_from_pretrained(monkeypatch, AutoModelForCausalLM, "model")
    tok_calls = _record_from_pretrained(monkeypatch, AutoTokenizer, _Tokenizer())
    assert loading.load_hf_model(f"{REPO}@abc123") == "model"
    loading.load_hf_model(REPO)
    assert model_calls == [(REPO, "abc123"), (REPO, None)]
    loading.load_tokenizer(f"{REPO}@abc123")
    assert tok_calls == [(REPO, "abc123")]


def test_load_model_boots_the_bridge_at_the_revision_and_records_it(tiny_model_dir, monkeypatch):
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tokenizer = loading.load_tokenizer(str(tiny_model_dir))
    model_calls = _record_from_pretrained(monkeypatch, AutoModelForCausalLM, hf_model)
    tok_calls = _record_from_pretrained(monkeypatch, AutoTokenizer, tokenizer)
    boot = TransformerBridge.boot_transformers
    booted = []

    def fake_boot(name, *args, revision=None, **kwargs):
        booted.append((name, revision))
        return boot(str(tiny_model_dir), *args, **kwargs)  # the hub's files, offline

    monkeypatch.setattr(TransformerBridge, "boot_transformers", fake_boot)
    model = loading.load_model(REPO, revision="abc123", device="cpu")
    assert model_calls == [(REPO, "abc123")] and tok_calls == [(REPO, "abc123")]
    assert booted == [(REPO, "abc123")]
    described = model.describe()
    assert described["revision"] == "abc123"
    assert described["spec"] == described["source"] == f"{REPO}@abc123"
    assert loading.load_model(f"{REPO}@abc123", device="cpu").describe()["revision"] == "abc123"


def test_the_revision_is_in_the_analysis_identity():
    # the identity records each checkpoint's spec verbatim: the pinned id carries the revision
    from emolens.run.analyze import series_of
    from emolens.run.identity import resolved_spec

    series = series_of(f"{REPO}@abc123", None)
    assert series.base == f"{REPO}@abc123"
    assert [resolved_spec(c.spec) for c in series.checkpoints] == [f"{REPO}@abc123"]


@pytest.mark.parametrize("command", ["analyze", "finetune", "labels"])
def test_cli_revision_pins_the_model_spec(command):
    extra = [] if command == "labels" else ["--out", "o"]
    args = parse_args([command, "--model", REPO, "--revision", "abc123", *extra])
    assert args.model == f"{REPO}@abc123"
    assert parse_args([command, "--model", REPO, *extra]).model == REPO
    with pytest.raises(ValueError, match="applies to a hub id"):
        parse_args([command, "--model", "tiny-random", "--revision", "abc123", *extra])
