"""Exceptions raised by umlipft.

Each message names what is wrong and what to do about it, in the spirit of ASE's errors.
The CLI prints them without a traceback; library users can catch them by class.
"""


class UmlipftError(Exception):
    """Base class of every error umlipft raises on purpose."""


class InputError(UmlipftError, ValueError):
    """A file, option or value supplied by the user cannot be used."""


class ConfigError(InputError):
    """A configuration (YAML file or flags) is invalid."""


class StateError(UmlipftError, RuntimeError):
    """A restartable run's saved state conflicts with the request."""


class ExternalProgramError(UmlipftError, RuntimeError):
    """An external program (LAMMPS, CP2K, xTB, ...) failed."""


class PlanError(ConfigError):
    """A workflow plan that cannot run as configured: every problem found, one per line.

    Raised before anything runs (no stage directory is created); the CLI exits with status 2,
    as for a command-line usage error."""

    exit_code = 2

    def __init__(self, problems: "list[str] | tuple[str, ...]") -> None:
        self.problems = list(problems)
        count = len(self.problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"the plan has {count} problem{'s' if count != 1 else ''}; nothing was run:\n{lines}")
