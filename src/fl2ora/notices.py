"""Notices that every output of a run carries when they apply."""

RANDOM_INIT_WARNING = (
    "The backbone is random-initialised: these numbers are a pipeline check, not evidence about CLIP."
)

REFERENCE_LABEL = "ECE/MCE use the reference code's non-standard definition"
