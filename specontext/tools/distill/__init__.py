"""``specontext-distill``: train a retrieval head to predict where the target model attends.

Three stages, each resumable from ``OUTPUT.work/``:

1. **Teacher** (:mod:`.teacher`). The target prefills each training sequence once (dense,
   chunked) and records, at sampled query positions, its layer-mean attention over the past
   positions per query head, with its hidden states after the fused layers.
2. **Training** (:mod:`.objective`, :mod:`.train`). The head (fc fusion, norms, Q/K) is fitted so
   that, per KV group, its distribution (normalised max over its query heads, as selection uses)
   matches the teacher's per-group target by KL divergence, over the loss region
   ``--loss-region`` picks. ``--task-mix`` (:mod:`.task_data`) adds retrieval tasks (needles,
   key-value lookups, variable tracking, passage questions; see :mod:`specontext.retrieval.tasks`)
   to the text: each is a document with a question, rendered with the chat template, with the
   model's own greedy answer (dense) appended; the positions that produce the answer are queries
   whose loss counts ``--answer-weight`` times. The artefact records the split.
3. **Quality** (:mod:`.objective`). On held-out sequences (by default the first tokens of the
   text, which training skips, so the accuracy harness evaluates on text the head never saw), the
   recall of the head's selection at several budgets next to the global oracle and StreamingLLM;
   saved in the artefact's ``quality``; with tasks, also the recall at the answer-producing
   positions of held-out task examples (built on the held-out text, with their own seeds).

:mod:`.config` holds the settings and the text split, :mod:`.cli` the command line. Example::

    from specontext.tools.distill import DistillConfig, distill
    path, quality = distill(specontext.load(), text, "heads/mine", DistillConfig(steps=300))
"""

from .cli import build_parser, main
from .config import DistillConfig, parse_task_mix
from .objective import distill_loss, evaluate, group_target, head_scores, selection_recall
from .task_data import TaskPool, task_prompt, task_teacher_sequence
from .teacher import TeacherProbe, TeacherSequence, answer_queries, query_weights, teacher_sequence
from .train import distill

__all__ = ["DistillConfig", "TaskPool", "TeacherProbe", "TeacherSequence", "answer_queries", "build_parser",
           "distill", "distill_loss", "evaluate", "group_target", "head_scores", "main", "parse_task_mix",
           "query_weights", "selection_recall", "task_prompt", "task_teacher_sequence", "teacher_sequence"]
