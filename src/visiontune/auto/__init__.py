"""``visiontune auto``: choose the adaptation method for the user's data, say how sure that is, ship that model.

One module per stage, all on the labeled training images only (the test split, when the data has one, is read once,
by the final run, for the report); :class:`~visiontune.auto.selection.AutoSelect` runs them in order:

1. **Plan** (:mod:`visiontune.auto.plan`). The labeled pool, stratified k-fold over it
   (``k = min(--folds, smallest class size)``, the same folds for every candidate so that differences are paired),
   the backbones (those given, else ``backbone.name``; with ``backbone.weights=offline`` and none named, the offline
   pair chosen by measurement, :data:`visiontune.backbones.offline.OFFLINE_AUTO_BACKBONES`), the candidates that
   apply to each, and time estimates from one measured forward pass. The options are one
   :class:`~visiontune.auto.settings.AutoSettings`.
2. **Cheap first** (:mod:`visiontune.auto.cheap`). Per backbone, features once per image; the linear probe and the
   nearest class mean on every fold; the best backbone is the one whose best cheap candidate scores highest. With
   ``--unlabeled DIR``, ExPLoRA pretraining of that backbone competes as another (:mod:`visiontune.auto.explora`).
3. **Escalate while it can pay** (:mod:`visiontune.auto.finetune`). The backbone family's fine-tuning candidates,
   fold by fold, from the probe's head, pruned by successive halving in thirds of a fold
   (:mod:`visiontune.auto.rungs`, Optuna's pruner) and ordered and stopped by an anytime budget
   (:mod:`visiontune.auto.schedule`, with the prior learned on the meta-benchmark, :mod:`visiontune.auto.prior`).
   The schedule is a number of optimizer steps (:data:`~visiontune.auto.folds.FINETUNE_STEPS`), never fewer epochs
   than ``optim.epochs``. Folds run in this process or as Ray tasks (:mod:`visiontune.auto.executor`).
4. **Decide like a statistician** (:mod:`visiontune.auto.leaderboard`, :mod:`visiontune.auto.decision`). Means and
   corrected intervals over folds, paired differences against the probe (:mod:`visiontune.auto.stats`), and a
   Bayesian decision: the highest posterior expected accuracy wins, less an explicit cost margin for a fine-tune.
5. **Ship** (:mod:`visiontune.auto.ship`, :mod:`visiontune.auto.report`). The winner retrained on every labeled image
   as a normal run in ``OUT/model``; ``OUT/leaderboard.md`` / ``.json`` and two plots hold the selection.

Everything is recorded in ``OUT/auto.json`` after each fold (atomically, :mod:`visiontune.auto.record`), and the
pruner's study in ``OUT/search.journal``: after Ctrl-C or a kill, the same command continues where it stopped.
Written by hand: the orchestration and the decision rule (no library chooses between fine-tuning methods); the
folds are scikit-learn's, the pruning Optuna's, the training visiontune's own loop.
"""

from visiontune.auto.candidates import Candidate
from visiontune.auto.plan import BALANCED, CHEAP, FINETUNE, PROBE, Plan, Task, offline_default_backbones
from visiontune.auto.selection import AutoSelect
from visiontune.auto.settings import AutoSettings, parse_budget
from visiontune.auto.stats import Estimate

__all__ = ["AutoSelect", "AutoSettings", "BALANCED", "CHEAP", "Candidate", "Estimate", "FINETUNE", "PROBE", "Plan",
           "Task", "offline_default_backbones", "parse_budget"]
