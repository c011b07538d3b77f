"""Hardware–model co-design: design spaces, evaluators, a MORPH-style proxy search and its baselines, Pareto fronts.

    from cimattn.codesign import load_space, run_study, summarise
    space = load_space("gaincell")                   # or a YAML path
    run_study(space, Path("runs/explore"), budget=20, methods=["proxy", "tpe"])
    summarise(space, Path("runs/explore"), ["proxy", "tpe"])   # hypervolume curves, front plot and table
"""

from cimattn.codesign.methods import METHODS
from cimattn.codesign.pareto import hypervolume, pareto_mask
from cimattn.codesign.report import summarise
from cimattn.codesign.space import Space, load_space, parse_space
from cimattn.codesign.study import StopStudy, run_study

__all__ = ["METHODS", "Space", "StopStudy", "hypervolume", "load_space", "pareto_mask", "parse_space", "run_study", "summarise"]
