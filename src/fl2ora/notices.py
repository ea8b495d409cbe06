"""Notices that every output of a run carries when they apply."""

RANDOM_INIT_WARNING = (
    "The backbone is random-initialised: these numbers are a pipeline check, not evidence about CLIP."
)

REFERENCE_LABEL = "ECE/MCE use the reference code's non-standard definition"

PACS_TEST_KFOLD_WARNING = (
    "PACS in-domain tests use test_kfold, which contains every training image (the reference code's "
    "behaviour): in-domain numbers score training images."
)
