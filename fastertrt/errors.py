"""Named errors raised by fastertrt's stages.

Each message says what was expected, what was found and what to do. The CLI
prints them without a traceback; the Python API lets them propagate.
"""


class FastertrtError(Exception):
    """Base class of every error fastertrt raises on purpose."""


# --- model input -------------------------------------------------------------
class ModelError(FastertrtError):
    """The model to compile cannot be used."""


class UnknownModelFamilyError(ModelError):
    """The model's architecture is not one fastertrt knows how to export."""


class NotAModelError(ModelError):
    """A path was given that is not a Hugging Face model folder."""


class ModelPackageMissingError(ModelError):
    """A shipped model was named but its package is not installed."""


# --- export ------------------------------------------------------------------
class ExportError(FastertrtError):
    """torch.onnx export failed or gave a graph fastertrt cannot use."""


class ParityError(ExportError):
    """ONNX Runtime and torch disagree beyond the tolerance on the same inputs."""


class MissingDependencyError(FastertrtError):
    """An optional package needed for this step is not installed."""


# --- bundle ------------------------------------------------------------------
class BundleError(FastertrtError):
    """A bundle folder cannot be loaded."""


class StageRunError(BundleError):
    """`fastertrt compare` could not run one stage of a bundle."""


class BundleNotFoundError(BundleError):
    """The path is not a bundle (no manifest.json)."""


class BundleIntegrityError(BundleError):
    """A file listed in the manifest is missing or its hash changed."""


class BundleSchemaError(BundleError):
    """The manifest's schema is newer than this fastertrt, or malformed."""


class SignatureError(BundleIntegrityError):
    """Trusted keys were given, and no valid signature by one of them covers the manifest."""


class BundleLockedError(BundleError):
    """Another fastertrt process is writing this bundle (or output folder)."""


# --- runtime inputs ------------------------------------------------------------
class InputError(FastertrtError, ValueError):
    """Inputs given to the runtime have the wrong type, rank, dtype or range."""


class OutputExistsError(FastertrtError):
    """The output path exists and overwriting was not asked for."""


class OutputRefusedError(OutputExistsError):
    """The output path holds something --force may not replace (not a fastertrt bundle or
    repository, the working directory, the source model...)."""


# --- rewrite -------------------------------------------------------------------
class RewriteError(FastertrtError):
    """A graph could not be fused with fastertrt's plugins as asked."""


# --- build ---------------------------------------------------------------------
class BuildError(FastertrtError):
    """TensorRT could not parse or build the graph."""


class ShapeSpecError(BuildError, ValueError):
    """A --shapes spec is malformed or does not fit the graph."""


# --- engines at run time ---------------------------------------------------------
class EngineMismatchError(BundleError):
    """The engine was built for another backend, version or GPU than this one."""


class ShapeOutOfProfileError(InputError):
    """Input shapes fall outside every optimization profile of the engine."""


class PluginMissingError(BundleError):
    """The engine uses a plugin that this installation cannot provide."""


# --- calibration -------------------------------------------------------------------
class CalibrationError(FastertrtError):
    """INT8 calibration could not run as asked."""


class CalibrationDataError(CalibrationError, InputError):
    """The calibration sample data is missing, empty or unreadable."""


class CalibrationCacheError(CalibrationError):
    """A calibration cache does not belong to this model or data."""
