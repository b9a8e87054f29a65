"""Rewards that classify the text: VADER sentiment, Hugging Face classifiers and reward models."""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from textgym.rewards.options import _choice, _texts
from textgym.rewards.registry import Reward

if TYPE_CHECKING:  # heavy imports are deferred until a reward needs them
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


# ---------------------------------------------------------------------------
# Sentiment
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _vader_analyzer() -> Any:
    """The shared VADER analyzer (building it parses the lexicon, so do it once)."""
    # imported on use: only the VADER reward needs it
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


class VaderReward(Reward):
    """VADER compound sentiment in [-1, 1] of the completion (or prompt + completion).

    :param include_prompt: score ``prompt + completion`` instead of the completion alone.
    """

    name = "vader"

    def __init__(self, include_prompt: bool = False) -> None:
        self.include_prompt = include_prompt
        self.analyzer = _vader_analyzer()

    def __call__(self, prompts: list[str], completions: list[str], **metadata: Any) -> list[float]:
        texts = _texts(prompts, completions, self.include_prompt)
        return [self.analyzer.polarity_scores(text)["compound"] for text in texts]


# ---------------------------------------------------------------------------
# Hugging Face classifiers and reward models
# ---------------------------------------------------------------------------


class ClassifierReward(Reward):
    """Score texts with a Hugging Face sequence-classification model.

    :param model: a model directory or hub id (loaded with
        ``AutoModelForSequenceClassification.from_pretrained``), or an already
        loaded model, in which case ``tokenizer`` is required.
    :param label: the class to score, as an index or a name from ``config.id2label``.
        May be omitted for single-output models (``num_labels == 1``).
    :param output: ``"prob"`` (softmax probability of ``label``; sigmoid when
        ``num_labels == 1``) or ``"logit"`` (the raw logit).
    :param include_prompt: score ``prompt + completion`` instead of the completion alone.
    :param max_length: inputs are truncated to this many tokens. None: the length the model was
        trained with by ``textgym rm`` / ``train_classifier`` (saved in its config as
        ``textgym_max_length``), else 512.
    :param device: torch device to run the model on.
    :param batch_size: number of texts per forward pass.
    :param tokenizer: a tokenizer or tokenizer path/id; defaults to ``model``.
    :param model_kwargs: extra keyword arguments for ``from_pretrained`` (e.g. ``dtype``).

    Inputs are right-padded, which is correct for encoders and for causal-LM
    backbones (``LlamaForSequenceClassification`` etc.), which pool the last
    non-padding token.  If the tokenizer has no pad token, the model's
    ``pad_token_id``, the EOS or the UNK token is used, and
    ``model.config.pad_token_id`` is set to the tokenizer's pad token id so the
    model finds the last real token.  Note that both objects are modified in place.
    """

    name = "classifier"

    def __init__(
        self,
        model: str | os.PathLike[str] | PreTrainedModel,
        label: int | str | None = None,
        output: str = "prob",
        include_prompt: bool = False,
        max_length: int | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        tokenizer: str | os.PathLike[str] | PreTrainedTokenizerBase | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer  # imported on use: a slow import

        self.output = _choice("output", output, ("prob", "logit"))
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                       or max_length < 1):
            raise ValueError(f"max_length must be a positive integer or None, got {max_length!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.include_prompt = include_prompt
        self.max_length = max_length
        self.batch_size = batch_size
        self.device = device

        if isinstance(model, (str, os.PathLike)):
            tokenizer = model if tokenizer is None else tokenizer
            loaded: PreTrainedModel = AutoModelForSequenceClassification.from_pretrained(model, **(model_kwargs or {}))
        elif tokenizer is None:
            raise ValueError("a loaded `model` needs `tokenizer=` as well")
        else:
            loaded = model
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        if max_length is None:
            max_length = int(getattr(loaded.config, "textgym_max_length", None) or 512)
        self.max_length = max_length
        # transformers wraps PreTrainedModel.to with functools.wraps(nn.Module.to), whose typed
        # signature then takes the device for ``self``
        self.model = loaded.to(device).eval()  # type: ignore[arg-type]
        self.tokenizer = tokenizer
        self._check_model(self.model)
        self._setup_padding()
        self.label_index = self._resolve_label(label)

    @property
    def num_labels(self) -> int:
        return int(self.model.config.num_labels)

    def _check_model(self, model: PreTrainedModel) -> None:
        """Hook for subclasses to reject unsuitable models."""

    def _setup_padding(self) -> None:
        """Give the tokenizer a pad token and tell the model its id."""
        tok, config = self.tokenizer, self.model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        if tok.pad_token is None:
            if text_config.pad_token_id is not None:
                tok.pad_token = tok.convert_ids_to_tokens(text_config.pad_token_id)
            elif tok.eos_token is not None:
                tok.pad_token = tok.eos_token
            elif tok.unk_token is not None:
                tok.pad_token = tok.unk_token
            else:
                raise ValueError("the tokenizer has no pad, eos or unk token to pad batches with")
        # Causal-LM backbones pool the last token that is not config.pad_token_id.
        config.pad_token_id = tok.pad_token_id
        text_config.pad_token_id = tok.pad_token_id  # the same object except for multimodal configs

    def _resolve_label(self, label: int | str | None) -> int:
        id2label = {int(i): str(name) for i, name in (self.model.config.id2label or {}).items()}
        valid = ", ".join(f"{i}={name!r}" for i, name in sorted(id2label.items())) or "none"
        if label is None:
            if self.num_labels == 1:
                return 0
            raise ValueError(
                f"the model has {self.num_labels} labels; choose one with `label` (valid labels: {valid})"
            )
        if isinstance(label, str):
            matches = [i for i, name in id2label.items() if name == label]
            if not matches:
                raise ValueError(f"unknown label {label!r}; valid labels: {valid}")
            return matches[0]
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < self.num_labels:
            raise ValueError(f"unknown label {label!r}; valid labels: {valid}")
        return label

    def __call__(self, prompts: list[str], completions: list[str], **metadata: Any) -> list[float]:
        import torch  # imported on use, as transformers above (heavy imports wait for a reward that needs them)

        texts = _texts(prompts, completions, self.include_prompt)
        scores: list[float] = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(
                    texts[start : start + self.batch_size],
                    padding=True,
                    padding_side="right",
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                logits = self.model(**batch).logits.float()
                if self.output == "logit":
                    values = logits[:, self.label_index]
                elif self.num_labels == 1:
                    values = torch.sigmoid(logits[:, 0])
                else:
                    values = torch.softmax(logits, dim=-1)[:, self.label_index]
                scores.extend(values.cpu().tolist())
        return scores


class RewardModelReward(ClassifierReward):
    """Raw score of a scalar reward model (TRL / InstructGPT convention).

    The model is an ``AutoModelForSequenceClassification`` with ``num_labels == 1``;
    the reward is its logit for ``prompt + completion`` (``include_prompt=True``).
    Other arguments are as for :class:`ClassifierReward`.
    """

    name = "reward_model"

    def __init__(
        self,
        model: str | os.PathLike[str] | PreTrainedModel,
        include_prompt: bool = True,
        max_length: int | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        tokenizer: str | os.PathLike[str] | PreTrainedTokenizerBase | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(
            model,
            label=0,
            output="logit",
            include_prompt=include_prompt,
            max_length=max_length,
            device=device,
            batch_size=batch_size,
            tokenizer=tokenizer,
            model_kwargs=model_kwargs,
        )

    def _check_model(self, model: PreTrainedModel) -> None:
        if model.config.num_labels != 1:
            raise ValueError(
                f"a reward model must output one scalar (num_labels == 1), but this model has "
                f"num_labels == {model.config.num_labels}; use the 'classifier' reward with "
                "`label=` to score one class of a multi-class model"
            )
