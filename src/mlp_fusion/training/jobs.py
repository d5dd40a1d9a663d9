"""A task's data and model made ready for fine-tuning or scoring, whatever kind of task it is.

:func:`load_job` reads a registered task's data (:mod:`mlp_fusion.training.tasks`), loads the model with
the head that task needs, and returns a :class:`Job`: the Trainer's inputs and the final scoring. The
``finetune`` command runs exactly this; a Python user runs it too::

    job = load_job("smollm2", "webnlg", TaskOptions(data=Path("data/webnlg"), max_train_samples=1000))
    fuse(job.loaded.model, FusionConfig(ratio=0.5, layers="20-29"))
    outcome = finetune(job.loaded.model, job.trainer_inputs, training_arguments(...), job.final_scores)

:func:`score_task` scores a fine-tuned model as ``evaluate`` does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ..errors import UserError
from .finetune import TrainSettings
from .tasks import GENERATION, TaskOptions, get_task, is_generation


@dataclass
class Job:
    """What differs between classification and data-to-text runs; the rest of a run is shared."""

    task: str
    loaded: object  # LoadedModel
    trainer_inputs: dict
    final_scores: Callable  # model -> metrics
    main_metric: str
    greater_is_better: bool
    train_count: int
    eval_count: int
    distill_texts: tuple  # (texts, pairs or None): the training inputs, for calibration and layer-wise tuning
    outputs: list = field(default_factory=list)  # generation: one record per evaluated input


def classification_task(name: str, options: TaskOptions):
    """The classification task ``name`` (``csv`` built from the column options)."""
    if {"--source-column", "--target-column"} & set(options.columns):
        raise UserError("--source-column and --target-column are for --task text2text")
    return get_task(
        name,
        text_column=options.text_column,
        pair_column=options.text_pair_column,
        label_column=options.label_column,
    )


def check_task(name: str, options: TaskOptions) -> bool:
    """Check the task's name and options before anything is loaded; True for a generation task."""
    if is_generation(name):
        options.check_decoding()
        return True
    classification_task(name, options)
    return False


def load_job(
    model: str,
    task: str,
    options: TaskOptions,
    settings: TrainSettings | None = None,
    load=None,
    progress: Callable[[str], None] | None = None,
    sharded: bool = False,
) -> Job:
    """``task``'s data read and ``model`` loaded for it (``load``: a :class:`~mlp_fusion.loading.LoadSettings`);
    ``settings`` gives the seed of a new classification head and the batch size of the final scoring.
    ``sharded`` (under torchrun, for ``finetune(..., sharded=True)``): a fused decoder checkpoint is read
    already split across the processes; other models are loaded whole and split when training starts."""
    settings = settings or TrainSettings(max_length=options.max_length)
    build = _generation_job if check_task(task, options) else _classification_job
    return build(model, task, options, settings, load, progress or (lambda _: None), sharded)


def _classification_job(model, name, options, settings, load, progress, sharded) -> Job:
    from .classifier import load_classifier
    from .data import load_task_data
    from .finetune import classification_inputs, evaluate

    data = load_task_data(classification_task(name, options), **_file_options(options), need_train=True)
    progress(f"loading {model}")
    loaded = load_classifier(model, data.task, seed=settings.seed, settings=load)
    return Job(
        task=data.task.name,
        loaded=loaded,
        trainer_inputs=classification_inputs(data, loaded.tokenizer, options.max_length),
        final_scores=lambda fitted: evaluate(
            fitted, loaded.tokenizer, data, batch_size=settings.batch_size, max_length=options.max_length
        ),
        main_metric=data.task.main_metric,
        greater_is_better=True,
        train_count=len(data.train),
        eval_count=len(data.evals[""]),
        distill_texts=(data.train.texts, data.train.pairs),
    )


def _generation_job(model, name, options, settings, load, progress, sharded) -> Job:
    from .data2text import PROMPT_END
    from .generation import generation_inputs, load_causal_lm, load_generation_data, score_generation

    data = load_generation_data(GENERATION[name], options, need_train=True)
    progress(f"loading {model}")
    loaded = load_causal_lm(model, load, sharded)
    if sharded and _is_sharded(loaded.model):
        progress(f"{model}: each process read only its own rows of every tensor")
    pairs = data.train_pairs()

    def final_scores(fitted) -> dict:
        metrics, records = score_generation(
            fitted, loaded.tokenizer, data.eval, max_new_tokens=options.max_new_tokens,
            num_beams=options.num_beams, batch_size=settings.batch_size, max_length=options.max_length,
        )  # fmt: skip
        job.outputs = records
        return metrics

    job = Job(
        task=name,
        loaded=loaded,
        trainer_inputs=generation_inputs(data, loaded.tokenizer, options.max_length),
        final_scores=final_scores,
        main_metric="loss",
        greater_is_better=False,
        train_count=len(pairs),
        eval_count=len(data.eval),
        distill_texts=([f"{source}{PROMPT_END} {target}" for source, target in pairs], None),
    )
    return job


def score_task(model: str, task: str, options: TaskOptions, load=None) -> tuple[dict, list[dict]]:
    """A fine-tuned ``model`` scored on ``task``'s evaluation split: the result (task, model, metrics,
    example counts) and, for generation tasks, one record per input (its output and references)."""
    if check_task(task, options):
        return _score_generation(model, task, options, load)
    return _score_classification(model, task, options, load), []


def _score_classification(model: str, name: str, options: TaskOptions, load) -> dict:
    from .classifier import load_trained_classifier
    from .data import load_task_data
    from .finetune import evaluate

    task = classification_task(name, options)
    loaded = load_trained_classifier(model, load)
    config = loaded.model.config
    if task.name == "csv":  # the label names the model was trained with
        task = replace(task, labels=tuple(config.id2label[i] for i in range(config.num_labels)))
    elif config.num_labels != task.num_labels:
        raise UserError(f"{model} predicts {config.num_labels} classes but {task.name} has {task.num_labels}")
    data = load_task_data(task, **_file_options(options), need_train=False)
    metrics = evaluate(loaded.model, loaded.tokenizer, data, max_length=options.max_length)
    examples = {prefix or "main": len(examples) for prefix, examples in data.evals.items()}
    return {"task": task.name, "model": loaded.source, "metrics": metrics, "examples": examples}


def _score_generation(model: str, name: str, options: TaskOptions, load) -> tuple[dict, list[dict]]:
    from .generation import load_causal_lm, load_generation_data, score_generation

    data = load_generation_data(GENERATION[name], options, need_train=False)
    loaded = load_causal_lm(model, load)
    metrics, records = score_generation(
        loaded.model, loaded.tokenizer, data.eval, max_new_tokens=options.max_new_tokens,
        num_beams=options.num_beams, max_length=options.max_length,
    )  # fmt: skip
    result = {"task": name, "model": loaded.source, "metrics": metrics, "examples": {"main": len(records)}}
    return result, records


def _file_options(options: TaskOptions) -> dict:
    """The keyword arguments of :func:`~mlp_fusion.training.data.load_task_data` that the options give."""
    names = (
        "data",
        "train_file",
        "eval_file",
        "max_train_samples",
        "max_eval_samples",
        "sample",
        "sample_seed",
    )
    return {name: getattr(options, name) for name in names}


def _is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)
