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
