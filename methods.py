"""
What defines each method, in one table that settings.py (the flags), record.py (the records),
dpo.py (which losses read pi_ref), ppo.py (which runs have a value head) and experiment.py (which
score an online run trains on) read. A run is "method:number", and the number is the method's
parameter: a run's folder is runs/<method>_<number>.
"""
from typing import NamedTuple, Optional


class Method(NamedTuple):
    # the name of the run's number: beta, alpha, lambda, the target KL (ft: none)
    param: Optional[str]
    positive: bool  # the number must be > 0 (else >= 0)
    example: str  # a run of it, for the error that asks for one
    reference: bool  # its training reads pi_ref (evaluation always does)
    # online (ppo.py): trains on 'rm', the learned reward model, or 'gt', r* itself
    score: Optional[str] = None
    value_head: bool = False  # PPO's critic: a scalar head on the policy


METHODS = {
    "dpo": Method("beta", True, "dpo:0.1", reference=True),
    "ipo": Method("beta", True, "ipo:0.1", reference=True),
    "cdpo": Method("beta", True, "cdpo:0.1", reference=True),
    "simpo": Method("beta", True, "simpo:2", reference=False),
    "orpo": Method("lambda", False, "orpo:0.1", reference=False),
    "kto": Method("beta", True, "kto:0.1", reference=True),
    "ft": Method(None, False, "ft", reference=False),  # Preferred-FT: the chosen responses' NLL
    "ul": Method("alpha", True, "ul:0.5 (ul:0 is Preferred-FT: ft)", reference=False),
    "ppo": Method("target KL", True, "ppo:6", reference=True, score="rm", value_head=True),
    "ppo-gt": Method("target KL", True, "ppo-gt:6", reference=True, score="gt", value_head=True),
    # beta: the KL coefficient
    "rloo": Method("beta", False, "rloo:0.05", reference=True, score="rm"),
    "grpo": Method("beta", False, "grpo:0.05", reference=True, score="rm"),
}
# the methods of ppo.py: they sample as they train
ONLINE = tuple(m for m, x in METHODS.items() if x.score)


def parse_runs(spec):
    """'dpo:0.1,ft,ppo:6' -> [('dpo', 0.1), ('ft', 0.0), ('ppo', 6.0)], or ValueError naming the bad
    run."""
    runs = []
    for run in spec.split(","):
        method, _, number = run.partition(":")
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r} in {run!r}; expected one of "
                             f"{', '.join(METHODS)}")
        try:
            value = float(number) if number else 0.0
        except ValueError:
            raise ValueError(f"{run!r}: the parameter {number!r} is not a number") from None
        m = METHODS[method]
        if m.param is None and number:
            raise ValueError(f"{run!r}: {method} takes no parameter")
        if m.param is not None and not (value > 0 if m.positive else number and value >= 0):
            name = ("a " if m.param == "target KL" else "") + m.param
            least = "> 0" if m.positive else ">= 0"
            raise ValueError(f"{run!r}: {method} needs {name} {least}, e.g. {m.example}")
        runs.append((method, value))
    return runs


def run_folder(method, param):
    """Where a run writes, under the run folder: runs/dpo_0.1, runs/ppo-gt_6, runs/ft."""
    return "runs/ft" if method == "ft" else f"runs/{method}_{param:g}"


def rollout_prompts(method, args):
    """Training prompts per rollout of an online run: --ppo-batch samples, one per prompt (PPO) or
    --group."""
    return args.ppo_batch // (1 if METHODS[method].value_head else args.group)
