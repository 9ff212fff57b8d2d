"""lm-eval's view of a matvlm model: any teacher or hybrid that `load_model` loads, as an `lm_eval` LM.

lm-eval's own `hf-multimodal` class loads models itself (so not our hybrids) and rewrites `<image>`
placeholders in prompts; the benchmarks here put the images in the request instead, as lmms-eval does,
and every image request gets the processor's chat template with one image entry per picture, the way
the teacher was trained and `matvlm generate` asks. Text-only requests (lm-eval tasks passed straight
through) are sent raw, as lm-eval does for any model without --apply_chat_template.

Batching, ordering and stopping are lm-eval's: `Collator` sorts longest first (so a batch is padded to
its first prompt, and an out-of-memory error comes at once) and restores the original order;
`stop_sequences_criteria` stops a batch once every row has produced a stop string, and each answer is cut
at its first stop string afterwards.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from lm_eval.api.model import LM
from lm_eval.models.utils import Collator, handle_stop_sequences
from lm_eval.models.utils_hf import stop_sequences_criteria
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from ..errors import MatvlmError
from ..hybrid.checks import resolve_device
from ..hybrid.conversion import HYBRID_KEY
from ..hybrid.load import load_model
from ..hybrid.processors import load_processor, render_chat
from .progress import DocumentKey, EvaluationProgress

DEFAULT_MAX_GEN_TOKS = 128  # the tasks' own budget (max_gen_toks in tasks/*.yaml; docs/evaluate.md)


def _ignore(answered: Iterable[DocumentKey]) -> None:
    """Progress reports of a model evaluated without a bar."""


class MatvlmLM(LM):
    """A teacher or hybrid directory, for `lm_eval.simple_evaluate(model=...)`."""

    MULTIMODAL = True

    def __init__(self, model_dir: str | Path, label: str, batch_size: int = 16, device: str = "auto",
                 progress: EvaluationProgress | None = None) -> None:
        super().__init__()
        self.model_dir, self.label, self.batch_size, self.progress = Path(model_dir), label, batch_size, progress
        self._device = resolve_device(device)
        self.model = load_model(self.model_dir).to(self._device).eval()
        self.processor = load_processor(self.model_dir)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.tokenizer.padding_side = "left"  # generation continues every row from its last prompt token
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        text_config = self.model.config.get_text_config(decoder=True)
        self.max_length = getattr(text_config, "max_position_embeddings", None) or 2048

    def get_model_info(self) -> dict:
        """Merged into results.json's `config` by lm-eval."""
        return {
            "model": str(self.model_dir),
            "model_name": self.label,
            "model_class": type(self.model).__name__,
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
            "model_dtype": str(next(self.model.parameters()).dtype),
            "matvlm_hybrid": getattr(self.model.config, HYBRID_KEY, None),
        }

    # --------------------------------------------------------------------------------------- generation

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        items = [(request.args, _document(request)) for request in requests]
        collator = Collator(
            items,
            sort_fn=lambda item: (-len(self.tokenizer(item[0][0]).input_ids), item[0][0]),
            group_by="gen_kwargs",
            group_fn=lambda item: item[0][1],
        )
        advance = self._track("generating", [key for _, key in items])
        answers = []
        for chunk in collator.get_batched(n=self.batch_size):
            answers += self._generate_batch([args for args, _ in chunk])
            advance(key for _, key in chunk)
        return collator.get_original(answers)

    def _generate_batch(self, batch: list[tuple]) -> list[str]:
        settings = copy.deepcopy(batch[0][1])  # the same for the whole batch: Collator groups by gen_kwargs
        until = handle_stop_sequences(settings.pop("until", None), eos=self.tokenizer.eos_token)
        max_new_tokens = int(settings.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
        temperature = float(settings.pop("temperature", 0.0))
        settings["do_sample"] = bool(settings.get("do_sample", temperature > 0))
        if settings["do_sample"]:
            settings["temperature"] = temperature
        inputs = self._encode_prompts([args[0] for args in batch], [args[2]["visual"] if len(args) > 2 else [] for args in batch])
        width = inputs["input_ids"].shape[1]
        output = self.model.generate(
            **inputs, max_new_tokens=max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
            stopping_criteria=stop_sequences_criteria(self.tokenizer, until, width, len(batch)), **settings,
        )
        answers = []
        for text in self.tokenizer.batch_decode(output[:, width:], skip_special_tokens=True):
            for stop in until:
                text = text.split(stop)[0] if stop else text
            answers.append(text.strip())
        return answers

    def _encode_prompts(self, contexts: list[str], images: list[list]) -> dict:
        """Image requests through the chat template and the processor; text-only ones as they come, without
        special tokens, as lm-eval's HF models encode them."""
        if not any(images):
            return self.tokenizer(contexts, return_tensors="pt", padding=True, add_special_tokens=False).to(self._device)
        if not hasattr(self.processor, "image_processor"):
            raise MatvlmError(f"{self.model_dir}: has no image processor, so it cannot run image tasks")
        texts = [
            render_chat(
                self.processor,
                [{"role": "user", "content": [*({"type": "image"} for _ in pictures), {"type": "text", "text": context}]}],
                add_generation_prompt=True,
            ) if pictures else context
            for context, pictures in zip(contexts, images)
        ]
        # The images of each prompt as their own list: processors that count images per prompt (Gemma 3,
        # Idefics3) need it, and those that flatten them (LLaVA, Qwen-VL) give the same tensors either way.
        nested = [list(pictures) for pictures in images]
        if not all(nested):  # a text-only prompt in an image batch: every processor takes a flat list then
            nested = [picture for pictures in images for picture in pictures]
        return self.processor(images=nested, text=texts, return_tensors="pt", padding=True).to(self._device, self.model.dtype)

    # ------------------------------------------------------------------------------------ log-likelihood

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        if any(len(request.args) > 2 for request in requests):
            raise NotImplementedError(
                "matvlm evaluate scores the log-likelihood of text only; image tasks are generate_until tasks "
                "(as pope, mmmu_val and textvqa_val are)"
            )
        pairs = [self._encode_pair(*request.args) for request in requests]
        documents = [_document(request) for request in requests]
        return self._score(pairs, documents, self._track("scoring", documents))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Perplexity-style scoring of whole texts, in windows of the model's context length."""
        advance = self._track("scoring", [_document(request) for request in requests])
        totals = []
        for request in requests:
            windows = get_rolling_token_windows(
                token_list=self._tokens(request.args[0]), prefix_token=self._prefix_token,
                max_seq_len=self.max_length, context_len=1,
            )
            totals.append(sum(logprob for logprob, _ in self._score([make_disjoint_window(w) for w in windows])))
            advance([_document(request)])
        return totals

    @property
    def _prefix_token(self) -> int:
        return self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id

    def _tokens(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's convention: trailing spaces of the context belong to the continuation, and the
        continuation's tokens are those of the whole text after the context's."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            return [self._prefix_token], self._tokens(continuation)
        context_tokens = self._tokens(context)
        return context_tokens, self._tokens(context + continuation)[len(context_tokens):]

    def _track(self, verb: str, documents: list[DocumentKey]) -> Callable[[Iterable[DocumentKey]], None]:
        return self.progress.track(verb, documents) if self.progress else _ignore

    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]], documents: list[DocumentKey] | None = None,
               advance: Callable[[Iterable[DocumentKey]], None] = _ignore) -> list[tuple[float, bool]]:
        """(log-probability of the continuation, whether greedy decoding would produce it) per pair, in
        right-padded batches: padding after a row cannot change the logits of the positions before it."""
        items = list(zip(pairs, documents or [("", 0)] * len(pairs)))
        collator = Collator(items, sort_fn=lambda item: -sum(map(len, item[0])))
        results = []
        for chunk in collator.get_batched(n=self.batch_size):
            rows = [(context + continuation)[-(self.max_length + 1):][:-1] for (context, continuation), _ in chunk]
            ids = torch.full((len(rows), max(map(len, rows))), self.tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, row in enumerate(rows):
                ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
            logits = self.model(input_ids=ids.to(self._device), attention_mask=mask.to(self._device)).logits
            logprobs = logits.float().log_softmax(-1)
            for i, ((_, continuation), _) in enumerate(chunk):
                scored = logprobs[i, len(rows[i]) - len(continuation) : len(rows[i])]
                target = torch.tensor(continuation, device=scored.device)
                results.append((scored.gather(-1, target[:, None]).sum().item(), bool((scored.argmax(-1) == target).all())))
            advance(key for _, key in chunk)
        return collator.get_original(results)


def _document(request) -> DocumentKey:
    """Which document of which task a request belongs to (a multiple-choice document sends one per choice)."""
    return request.task_name, request.doc_id

