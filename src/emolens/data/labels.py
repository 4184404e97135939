"""Emotion label sets, the study's prompt template, and label-token resolution with its audit.

The observed quantity of the study is the logit of the FIRST token a model would emit for a
label right after the prompt. That token is resolved from the tokenization of
``prompt + label``, never of the label alone, because tokenizers merge across the boundary.
"""

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, cast

from emolens.data.tokens import encode

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Emotion:
    """One label: its Japanese name (as in the paper's prompt) and crowd-enVENT English name."""

    ja: str
    en: str

    def name(self, language: str) -> str:
        if language not in ("ja", "en"):
            raise ValueError(f"unknown language {language!r}; use 'ja' or 'en'")
        return self.ja if language == "ja" else self.en


NEUTRAL = Emotion("中立", "no-emotion")

#: The 13 labels of the study, in the order of the paper's prompt (Figure 1).
STUDY_EMOTIONS: tuple[Emotion, ...] = (
    Emotion("怒り", "anger"),
    Emotion("退屈", "boredom"),
    Emotion("嫌悪", "disgust"),
    Emotion("恐怖", "fear"),
    Emotion("罪悪感", "guilt"),
    Emotion("喜び", "joy"),
    Emotion("誇り", "pride"),
    Emotion("安堵", "relief"),
    Emotion("悲しみ", "sadness"),
    Emotion("恥", "shame"),
    Emotion("驚き", "surprise"),
    Emotion("信頼", "trust"),
    NEUTRAL,
)

#: Other spellings accepted for labels on input (lower-cased English keys).
_ALIASES = {
    "neutral": "no-emotion",
    "none": "no-emotion",
    "noemotion": "no-emotion",
    "no emotion": "no-emotion",
    "no_emotion": "no-emotion",
}


class UnknownLabelError(ValueError):
    """A label name that is not in the label set."""


@dataclass(frozen=True)
class LabelSet:
    """An ordered set of emotions, one of which is the neutral reference for concept vectors."""

    emotions: tuple[Emotion, ...] = STUDY_EMOTIONS
    neutral: Emotion = NEUTRAL

    def __post_init__(self) -> None:
        if self.neutral not in self.emotions:
            raise ValueError(f"the neutral label {self.neutral.en!r} must be in the label set")
        for lang in ("ja", "en"):
            names = [e.name(lang) for e in self.emotions]
            if len(set(names)) != len(names):
                raise ValueError(f"duplicate {lang} label names in {names}")

    def __len__(self) -> int:
        return len(self.emotions)

    def __iter__(self) -> Iterator[Emotion]:
        return iter(self.emotions)

    def names(self, language: str = "en") -> list[str]:
        return [e.name(language) for e in self.emotions]

    @property
    def neutral_index(self) -> int:
        return self.emotions.index(self.neutral)

    def index(self, name: str) -> int:
        """Index of a label given in Japanese or English (case-insensitive, 'neutral' accepted)."""
        return self.emotions.index(self.lookup(name))

    def lookup(self, name: str) -> Emotion:
        key = name.strip()
        low = _ALIASES.get(key.lower(), key.lower())
        for e in self.emotions:
            if key == e.ja or low == e.en.lower():
                return e
        raise UnknownLabelError(
            f"unknown label {name!r}; accepted labels are {', '.join(self.names('en'))} "
            f"or in Japanese {'、'.join(self.names('ja'))} ('neutral' also means no-emotion)"
        )

    def subset(self, names: Iterable[str]) -> "LabelSet":
        chosen = tuple(self.lookup(n) for n in names)
        if self.neutral not in chosen:
            chosen = chosen + (self.neutral,)
        return LabelSet(tuple(e for e in self.emotions if e in chosen), self.neutral)

    def to_dict(self) -> dict:
        return {"emotions": [asdict(e) for e in self.emotions], "neutral": asdict(self.neutral)}

    @classmethod
    def from_dict(cls, d: dict) -> "LabelSet":
        return cls(tuple(Emotion(**e) for e in d["emotions"]), Emotion(**d["neutral"]))


STUDY_LABELS = LabelSet()


@dataclass(frozen=True)
class PromptTemplate:
    """A classification prompt with ``{labels}`` and ``{text}`` slots.

    ``label_prefix`` is what stands between the prompt and the label in the answer (nothing in
    Japanese after 「答え：」, a space in English after "Answer:").
    """

    template: str
    language: str
    label_separator: str
    label_prefix: str = ""

    def format(self, text: str, labels: LabelSet = STUDY_LABELS) -> str:
        names = self.label_separator.join(labels.names(self.language))
        return self.template.replace("{labels}", names).replace("{text}", text)

    def answer(self, emotion: Emotion) -> str:
        """The continuation the model is trained to emit for ``emotion``."""
        return self.label_prefix + emotion.name(self.language)

    def to_dict(self) -> dict:
        return asdict(self)


#: The paper's Figure 1 prompt. With the study's labels it reproduces the paper byte for byte.
JA_TEMPLATE = PromptTemplate(
    template="次の感情リストを考えてください：{labels} 次の文脈から推測される感情は何ですか？ "
    "文脈：'{text}' 答え：",
    language="ja",
    label_separator="、",
)

#: The same prompt in English, for English models.
EN_TEMPLATE = PromptTemplate(
    template="Consider the following list of emotions: {labels}. Which emotion can be inferred "
    "from the following context? Context: '{text}' Answer:",
    language="en",
    label_separator=", ",
    label_prefix=" ",
)

TEMPLATES = {"ja": JA_TEMPLATE, "en": EN_TEMPLATE}


def render_prompts(
    texts: Sequence[str],
    template: PromptTemplate = JA_TEMPLATE,
    labels: LabelSet = STUDY_LABELS,
    tokenizer: "PreTrainedTokenizerBase | None" = None,
    chat: bool = False,
) -> list[str]:
    """Prompt strings for ``texts``; with ``chat`` the prompt is the user turn of the tokenizer's
    chat template, followed by the generation prompt (off by default, as in the paper)."""
    prompts = [template.format(t, labels) for t in texts]
    if not chat:
        return prompts
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat=True needs a tokenizer with a chat template; this one has none")
    # with tokenize=False the template gives a string (HF types the union of all returns)
    return [
        cast(
            str,
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            ),
        )
        for p in prompts
    ]


class LabelTokenError(ValueError):
    """Labels whose first tokens cannot be observed separately."""


@dataclass(frozen=True)
class LabelToken:
    """How one label tokenizes right after the prompt."""

    ja: str
    en: str
    answer: str
    first_token_id: int
    first_token: str
    n_tokens: int
    token_ids: list[int]
    shares_first_token_with: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class LabelTokens:
    """Resolved label tokens of one model: ``ids[emotion]`` is the observed first token."""

    labels: LabelSet
    entries: tuple[LabelToken, ...]

    @property
    def ids(self) -> list[int]:
        return [e.first_token_id for e in self.entries]

    @property
    def answer_token_ids(self) -> list[list[int]]:
        return [e.token_ids for e in self.entries]

    def to_dict(self) -> dict:
        return {"labels": self.labels.to_dict(), "entries": [asdict(e) for e in self.entries]}

    @classmethod
    def from_dict(cls, d: dict) -> "LabelTokens":
        """Read back what :meth:`to_dict` wrote (a step's ``label_audit.json``)."""
        return cls(LabelSet.from_dict(d["labels"]), tuple(LabelToken(**e) for e in d["entries"]))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, indent=2)

    def format_table(self) -> str:
        rows = [("label", "english", "first token", "id", "n tokens", "shares first token with")]
        for e in self.entries:
            rows.append(
                (
                    e.ja,
                    e.en,
                    repr(e.first_token),
                    str(e.first_token_id),
                    str(e.n_tokens),
                    ", ".join(e.shares_first_token_with) or "-",
                )
            )
        widths = [max(_width(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join(
            "  ".join(c + " " * (w - _width(c)) for c, w in zip(r, widths)) for r in rows
        )


def _width(s: str) -> int:
    """Display width: East Asian wide characters take two columns."""
    import unicodedata

    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in s)


_REFERENCE_TEXT = "今日は駅まで歩いた。"


def resolve_label_tokens(
    tokenizer: "PreTrainedTokenizerBase",
    template: PromptTemplate = JA_TEMPLATE,
    labels: LabelSet = STUDY_LABELS,
    *,
    chat: bool = False,
    allow_shared: bool = False,
    reference_text: str = _REFERENCE_TEXT,
    add_special_tokens: bool | None = None,
) -> LabelTokens:
    """Resolve each label's observed first token from the tokenization of prompt + answer
    (encoded as :meth:`PromptSpec.encode` does; ``add_special_tokens`` None: not with chat).

    Raises :class:`LabelTokenError` when the prompt's own tokens change once the label is
    appended (the label merges with the prompt's last token), and when two labels share a first
    token unless ``allow_shared`` (their logits could not be told apart).
    """
    special = (not chat) if add_special_tokens is None else add_special_tokens
    prompt = render_prompts([reference_text], template, labels, tokenizer, chat)[0]
    (prompt_ids,) = encode(tokenizer, [prompt], special)
    entries = []
    for emotion in labels:
        answer = template.answer(emotion)
        (full_ids,) = encode(tokenizer, [prompt + answer], special)
        if full_ids[: len(prompt_ids)] != prompt_ids or len(full_ids) == len(prompt_ids):
            raise LabelTokenError(
                f"label {emotion.ja!r} ({emotion.en}) merges with the end of the prompt when "
                f"tokenized (prompt ends with {tokenizer.decode(prompt_ids[-3:])!r}), so its "
                "first token cannot be observed at the answer position; change the template's "
                "ending or label_prefix so the answer starts a new token"
            )
        answer_ids = list(full_ids[len(prompt_ids) :])
        entries.append(
            LabelToken(
                ja=emotion.ja,
                en=emotion.en,
                answer=answer,
                first_token_id=int(answer_ids[0]),
                first_token=cast(str, tokenizer.decode([answer_ids[0]])),  # one id: a str
                n_tokens=len(answer_ids),
                token_ids=[int(i) for i in answer_ids],
            )
        )
    shared = []
    final = []
    for e in entries:
        others = [o.en for o in entries if o is not e and o.first_token_id == e.first_token_id]
        if others:
            shared.append(
                f"{e.en} ({e.ja}) shares first token {e.first_token!r} "
                f"(id {e.first_token_id}) with {', '.join(others)}"
            )
        final.append(LabelToken(**{**asdict(e), "shares_first_token_with": others}))
    if shared and not allow_shared:
        raise LabelTokenError(
            "labels share a first token, so their logits cannot be told apart: "
            + "; ".join(shared)
            + ". Drop one of them from the label set, or pass allow_shared=True "
            "(--allow-shared-tokens) to accept it knowingly."
        )
    return LabelTokens(labels, tuple(final))


# --------------------------------------------------------------------------- prompt spec


class PromptMismatchError(ValueError):
    """The prompt asked for differs from the one a run was fine-tuned with."""


@dataclass(frozen=True)
class PromptSpec:
    """Everything that turns a text into the token ids a model sees: the template (and so the
    language), the label set written into it, the chat wrapping and the special-token policy.

    Fine-tuning, filtering, analysis and localisation all encode through :meth:`encode`, and
    ``finetune`` records the spec in the run folder (``RUN/prompt.json``) for the others to
    read. ``add_special_tokens`` None means the convention of HF's ``apply_chat_template``: the
    tokenizer's special tokens (e.g. Gemma's BOS) are added to a plain prompt, and nothing is
    added to a chat-rendered one, whose template already writes its own (a BOS added on top
    would double it).
    """

    template: PromptTemplate = JA_TEMPLATE
    labels: LabelSet = STUDY_LABELS
    chat: bool = False
    add_special_tokens: bool | None = None

    def __post_init__(self) -> None:
        if self.add_special_tokens is None:
            object.__setattr__(self, "add_special_tokens", not self.chat)

    @classmethod
    def for_language(
        cls, language: str = "ja", labels: LabelSet = STUDY_LABELS, chat: bool = False
    ) -> "PromptSpec":
        """The bundled template of ``language`` ('ja' is the paper's Figure 1 prompt)."""
        if language not in TEMPLATES:
            raise ValueError(f"unknown prompt language {language!r}; use {' or '.join(TEMPLATES)}")
        return cls(TEMPLATES[language], labels, chat)

    @property
    def language(self) -> str:
        return self.template.language

    def with_options(
        self,
        *,
        language: str | None = None,
        chat: bool | None = None,
        labels: LabelSet | None = None,
    ) -> "PromptSpec":
        """This spec with the given options changed (None keeps a field). A new language takes
        its bundled template; a changed ``chat`` takes the default special-token policy."""
        if language is not None and language not in TEMPLATES:
            raise ValueError(f"unknown prompt language {language!r}; use {' or '.join(TEMPLATES)}")
        template = self.template if language in (None, self.language) else TEMPLATES[language]
        new_chat = self.chat if chat is None else bool(chat)
        special = self.add_special_tokens if new_chat == self.chat else None
        return PromptSpec(template, self.labels if labels is None else labels, new_chat, special)

    def render(self, tokenizer: "PreTrainedTokenizerBase", texts: Sequence[str]) -> list[str]:
        """Prompt strings of ``texts`` (``tokenizer`` is needed only with ``chat``)."""
        return render_prompts(texts, self.template, self.labels, tokenizer, self.chat)

    def encode(self, tokenizer: "PreTrainedTokenizerBase", texts: Sequence[str]) -> list[list[int]]:
        """Token ids of the prompts of ``texts``, exactly as fine-tuning feeds them."""
        assert self.add_special_tokens is not None  # set by __post_init__
        return encode(tokenizer, self.render(tokenizer, texts), self.add_special_tokens)

    def label_tokens(
        self, tokenizer: "PreTrainedTokenizerBase", *, allow_shared: bool = False
    ) -> LabelTokens:
        """Each label's observed first token after this prompt."""
        return resolve_label_tokens(
            tokenizer,
            self.template,
            self.labels,
            chat=self.chat,
            allow_shared=allow_shared,
            add_special_tokens=self.add_special_tokens,
        )

    def describe(self) -> str:
        """One line for messages: language, chat, special tokens, labels."""
        return (
            f"language={self.language}, chat={'on' if self.chat else 'off'}, "
            f"special tokens={'added' if self.add_special_tokens else 'none'}, "
            f"labels={','.join(self.labels.names('en'))}"
        )

    def to_dict(self) -> dict:
        return {
            "template": self.template.to_dict(),
            "labels": self.labels.to_dict(),
            "chat": self.chat,
            "add_special_tokens": self.add_special_tokens,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "PromptSpec":
        return cls(
            PromptTemplate(**d["template"]),
            LabelSet.from_dict(d["labels"]),
            bool(d["chat"]),
            d.get("add_special_tokens"),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, indent=2)


#: The study's prompt: the paper's Figure 1 template with its 13 labels, no chat wrapping.
STUDY_PROMPT = PromptSpec()
