"""GP-HM PDE solver on Kronecker grids (`GPHMSolver`) and the paper's benchmark problems."""
from .derivatives import AxisOperators, Derivatives
from .mixture import KERNELS, SpectralMixture
from .problems import PROBLEMS, ExactDerivatives, Problem
from .solver import FitHistory, GPHMSolver

__all__ = ["AxisOperators", "Derivatives", "ExactDerivatives", "FitHistory", "GPHMSolver", "KERNELS", "PROBLEMS", "Problem",
           "SpectralMixture"]
