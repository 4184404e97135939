import pytest
import torch

from emolens.data.labels import render_prompts
from emolens.data.tokens import encode
from emolens.measure.generate import UNSTEERED, greedy_continuations, steered_generations
from emolens.model import hooks

TEXTS = ["駅まで歩いた。", "雨の中、傘を忘れて帰った。"]


@pytest.fixture(scope="module")
def prompts(tiny_model):
    return encode(tiny_model.tokenizer, render_prompts(TEXTS))


@pytest.fixture(scope="module")
def hf_reference(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def _hf_greedy(hf, prompt, n, eos=None):
    ids = torch.tensor([prompt])
    out = hf.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        min_new_tokens=n if eos is None else 0,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=eos if eos is not None else 0,
    )
    return out[0, len(prompt) :]


def test_unsteered_and_alpha_zero_equal_hf_greedy_generate(tiny_model, prompts, hf_reference):
    d = tiny_model.bridge.cfg.d_model
    for prompt in prompts:
        expected = _hf_greedy(hf_reference, prompt, 12)
        assert torch.equal(greedy_continuations(tiny_model, prompt, None, -1, 12)[0], expected)
        zero = greedy_continuations(tiny_model, prompt, torch.zeros(3, d), 1, 12)
        assert all(torch.equal(row, expected) for row in zero)


def test_steering_changes_the_words_and_rows_are_independent(tiny_model, prompts):
    d = tiny_model.bridge.cfg.d_model
    v = torch.randn(d, generator=torch.Generator().manual_seed(0))
    alone = greedy_continuations(tiny_model, prompts[0], 6.0 * v[None], 2, 10)
    batch = greedy_continuations(
        tiny_model, prompts[0], torch.stack([torch.zeros(d), 6.0 * v, -6.0 * v]), 2, 10
    )
    assert torch.equal(batch[1], alone[0])
    assert not torch.equal(batch[0], batch[1]) and not torch.equal(batch[1], batch[2])


def test_hooks_are_removed_after_an_exception(tiny_model, prompts, monkeypatch):
    bridge = tiny_model.bridge
    hook_point = bridge.hook_dict[hooks.resid_post(1)]
    before = bridge(torch.tensor([prompts[0]]))
    d = bridge.cfg.d_model

    calls = {"n": 0}
    real_argmax = torch.Tensor.argmax

    def failing_argmax(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return real_argmax(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "argmax", failing_argmax)
    with pytest.raises(RuntimeError, match="boom"):
        greedy_continuations(tiny_model, prompts[0], torch.ones(2, d) * 5.0, 1, 5)
    monkeypatch.undo()
    assert not hook_point._forward_hooks
    assert torch.equal(bridge(torch.tensor([prompts[0]])), before)


def test_steered_generations_table(tiny_model, prompts, hf_reference):
    d = tiny_model.bridge.cfg.d_model
    vectors = torch.randn(2, d, generator=torch.Generator().manual_seed(1)) * 4
    table = steered_generations(
        tiny_model,
        prompts,
        vectors,
        [0.0, 1.0, 3.0],
        -1,
        emotions=["joy", "fear"],
        prompt_ids=["p0", "p1"],
        max_new_tokens=8,
        batch_size=2,
        progress=False,
    )
    assert len(table) == 2 * (1 + 2 * 2)
    assert list(table.columns) == ["emotion", "alpha", "prompt_id", "text", "n_tokens"]
    base = table[(table.emotion == UNSTEERED) & (table.prompt_id == "p1")]
    eos = tiny_model.tokenizer.eos_token_id
    expected = _hf_greedy(hf_reference, prompts[1], 8, eos).tolist()
    expected = expected[: expected.index(eos)] if eos in expected else expected
    assert base.text.iloc[0] == tiny_model.tokenizer.decode(expected, skip_special_tokens=True)
    one = table[(table.emotion == "joy") & (table.alpha == 3.0) & (table.prompt_id == "p0")]
    tokens = greedy_continuations(tiny_model, prompts[0], 3.0 * vectors[:1], -1, 8, eos)[0]
    tokens = tokens.tolist()
    tokens = tokens[: tokens.index(eos)] if eos in tokens else tokens
    assert one.text.iloc[0] == tiny_model.tokenizer.decode(tokens, skip_special_tokens=True)
    with pytest.raises(ValueError, match="emotion names"):
        steered_generations(
            tiny_model, prompts, vectors, [1.0], -1, emotions=["joy"], prompt_ids=["a", "b"]
        )


@pytest.fixture(scope="module")
def analysis_out(tmp_path_factory, tiny_model_dir):
    from emolens.data.corpus import bundled_corpus_path, read_corpus
    from emolens.run.analyze import analyze
    from emolens.run.config import AnalysisConfig

    header, *lines = bundled_corpus_path().read_text(encoding="utf-8").splitlines()
    seen: dict[str, int] = {}
    kept = []
    for line in lines:  # the first 3 samples of each label
        label = line.split("\t")[1]
        seen[label] = seen.get(label, 0) + 1
        if seen[label] <= 3:
            kept.append(line)
    data = tmp_path_factory.mktemp("data") / "corpus.tsv"
    data.write_text("\n".join([header, *kept]) + "\n", encoding="utf-8")
    corpus = read_corpus(data)
    config = AnalysisConfig(
        layers="1,-1",
        alphas=(0.0, 4.0),
        n_prompts=2,
        min_count=1,
        n_boot=2,
        dla_per_label=1,
        filter_mode="none",
    )
    out = tmp_path_factory.mktemp("analysis")
    analyze(tiny_model_dir, corpus, out, config, device="cpu")
    return out, data


def test_generate_command_writes_resumes_and_refuses_other_settings(analysis_out, capsys):
    import pandas as pd

    from emolens.cli import main

    analysis_out, data = analysis_out
    argv = ["generate", str(analysis_out), "--data", str(data), "--max-new-tokens", "4"]
    argv += ["--layer", "1"]
    assert main(argv + ["--alphas", "3"]) == 0
    table = pd.read_csv(analysis_out / "generations.csv", keep_default_na=False)
    assert list(table.columns) == ["step", "emotion", "alpha", "prompt_id", "text", "n_tokens"]
    n_emotions = table[table.emotion != UNSTEERED].emotion.nunique()
    assert n_emotions >= 2 and len(table) == 2 * (1 + n_emotions)
    assert set(table.alpha) == {0.0, 3.0} and set(table.step) == {0}
    assert (table.n_tokens <= 4).all()
    part = analysis_out / "generations" / "step-0.csv"
    stamp = part.stat().st_mtime_ns
    assert main(argv + ["--alphas", "3"]) == 0  # resumes: the finished step is reused
    assert part.stat().st_mtime_ns == stamp
    assert main(argv + ["--alphas", "5"]) != 0
    assert "--overwrite" in capsys.readouterr().err
    assert pd.read_csv(part).alpha.max() == 3.0  # nothing lost
    assert main(argv + ["--alphas", "5", "--overwrite"]) == 0
    assert pd.read_csv(analysis_out / "generations.csv").alpha.max() == 5.0


def test_report_shows_steered_text_heads_and_lens(analysis_out):
    import html

    import pandas as pd

    from emolens.cli import main
    from emolens.report.page import write_report

    out, data = analysis_out
    argv = ["generate", str(out), "--data", str(data), "--max-new-tokens", "3"]
    assert main(argv + ["--alphas", "2", "--overwrite"]) == 0
    page = write_report(out).read_text(encoding="utf-8")
    for title in ("Steered text", "Per-head attribution", "Logit lens"):
        assert f">{title}<" in page
    assert "could not be shown as designed" not in page
    table = pd.read_csv(out / "generations.csv", keep_default_na=False)
    steered = table[(table.alpha == 2.0) & (table.prompt_id == table.prompt_id.iloc[0])]
    assert any(html.escape(t) in page for t in steered.text if t.strip())
