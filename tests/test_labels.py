import json

import pytest

from emolens.data.labels import (
    EN_TEMPLATE,
    JA_TEMPLATE,
    NEUTRAL,
    STUDY_LABELS,
    Emotion,
    LabelSet,
    LabelTokenError,
    PromptTemplate,
    UnknownLabelError,
    render_prompts,
    resolve_label_tokens,
)
from emolens.data.tokens import encode

PAPER_PROMPT = (
    "次の感情リストを考えてください：怒り、退屈、嫌悪、恐怖、罪悪感、喜び、誇り、安堵、悲しみ、恥、"
    "驚き、信頼、中立 次の文脈から推測される感情は何ですか？ 文脈：'{text}' 答え："
)


def test_japanese_prompt_is_the_papers_figure_1_byte_for_byte():
    text = "友達が誕生日を覚えていてくれた。"
    assert JA_TEMPLATE.format(text).encode() == PAPER_PROMPT.replace("{text}", text).encode()


def test_study_labels_are_the_thirteen_in_paper_order_with_neutral_last():
    expected = "怒り 退屈 嫌悪 恐怖 罪悪感 喜び 誇り 安堵 悲しみ 恥 驚き 信頼 中立".split()
    assert STUDY_LABELS.names("ja") == expected
    assert STUDY_LABELS.names("en")[-1] == "no-emotion"
    assert STUDY_LABELS.neutral == NEUTRAL and STUDY_LABELS.neutral_index == 12


def test_english_prompt_has_the_same_shape():
    prompt = EN_TEMPLATE.format("I missed the bus.")
    assert prompt.startswith("Consider the following list of emotions: anger, boredom,")
    assert prompt.endswith("Context: 'I missed the bus.' Answer:")
    assert EN_TEMPLATE.answer(STUDY_LABELS.lookup("joy")) == " joy"


@pytest.mark.parametrize("name", ["joy", "JOY", " joy ", "喜び"])
def test_lookup_accepts_english_and_japanese(name):
    assert STUDY_LABELS.lookup(name) == Emotion("喜び", "joy")


@pytest.mark.parametrize("name", ["neutral", "no emotion", "no-emotion", "中立"])
def test_lookup_accepts_neutral_spellings(name):
    assert STUDY_LABELS.lookup(name) == NEUTRAL


def test_unknown_label_error_lists_accepted_names():
    with pytest.raises(UnknownLabelError, match=r"unknown label 'happiness'.*anger, boredom"):
        STUDY_LABELS.lookup("happiness")


def test_subset_keeps_order_and_neutral():
    sub = STUDY_LABELS.subset(["trust", "喜び"])
    assert sub.names("en") == ["joy", "trust", "no-emotion"]
    assert LabelSet.from_dict(json.loads(json.dumps(sub.to_dict()))) == sub


def test_label_set_rejects_duplicates_and_missing_neutral():
    with pytest.raises(ValueError, match="duplicate"):
        LabelSet((Emotion("a", "x"), Emotion("a", "y"), NEUTRAL))
    with pytest.raises(ValueError, match="neutral"):
        LabelSet((Emotion("a", "x"),), NEUTRAL)


def test_chat_needs_a_chat_template(tiny_model):
    with pytest.raises(ValueError, match="chat template"):
        render_prompts(["x"], tokenizer=tiny_model.tokenizer, chat=True)


def test_label_first_token_comes_from_prompt_plus_label(tiny_model):
    tok = tiny_model.tokenizer
    resolved = resolve_label_tokens(tok)
    prompt = JA_TEMPLATE.format("今日は駅まで歩いた。")
    (prompt_ids,) = encode(tok, [prompt])
    for entry, emotion in zip(resolved.entries, STUDY_LABELS):
        (full,) = encode(tok, [prompt + emotion.ja])
        assert entry.first_token_id == full[len(prompt_ids)]
        assert entry.token_ids == full[len(prompt_ids) :]
        assert entry.n_tokens == len(full) - len(prompt_ids)
    assert resolved.ids == [e.first_token_id for e in resolved.entries]
    table = resolved.format_table()
    assert "罪悪感" in table and "guilt" in table
    assert json.loads(resolved.to_json())["entries"][0]["en"] == "anger"


def test_labels_sharing_a_first_token_are_an_error_unless_allowed(tiny_model):
    labels = LabelSet((Emotion("xq1", "xq-one"), Emotion("xq2", "xq-two"), NEUTRAL))
    shared = r"xq-one \(xq1\) shares first token .* \(id \d+\) with xq-two"
    with pytest.raises(LabelTokenError, match=shared):
        resolve_label_tokens(tiny_model.tokenizer, labels=labels)
    resolved = resolve_label_tokens(tiny_model.tokenizer, labels=labels, allow_shared=True)
    assert resolved.entries[0].shares_first_token_with == ["xq-two"]
    assert resolved.entries[2].shares_first_token_with == []


class _MergingTokenizer:
    """Characters are tokens, except that 'ab' is one token: a label 'b' after 'a' merges."""

    def __call__(self, texts, add_special_tokens=True):
        out = []
        for t in texts:
            ids, i = [], 0
            while i < len(t):
                if t[i : i + 2] == "ab":
                    ids.append(1000)
                    i += 2
                else:
                    ids.append(ord(t[i]))
                    i += 1
            out.append(ids)
        return {"input_ids": out}

    def decode(self, ids):
        return "".join("ab" if i == 1000 else chr(i) for i in ids)


def test_label_merging_into_the_prompt_is_a_clear_error():
    template = PromptTemplate("{text} a", "en", ", ")
    labels = LabelSet((Emotion("x", "bee"), NEUTRAL))
    with pytest.raises(LabelTokenError, match="merges with the end of the prompt"):
        resolve_label_tokens(_MergingTokenizer(), template, labels)
