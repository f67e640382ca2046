"""DEAP's ``data_preprocessed_python`` format: sampling rate, shapes, channel order, rating
columns. A leaf module: the loader (``zoo.data.deap``) and the demo writer
(``zoo.data.demo.deap``) both read it, and neither imports the other."""

SFREQ = 128
N_CHANNELS = 40
N_SAMPLES = 8064
BASELINE_SAMPLES = 3 * SFREQ
N_LABELS = 4
EEG_CHANNELS = [
    "Fp1",
    "AF3",
    "F3",
    "F7",
    "FC5",
    "FC1",
    "C3",
    "T7",
    "CP5",
    "CP1",
    "P3",
    "P7",
    "PO3",
    "O1",
    "Oz",
    "Pz",
    "Fp2",
    "AF4",
    "Fz",
    "F4",
    "F8",
    "FC6",
    "FC2",
    "Cz",
    "C4",
    "T8",
    "CP6",
    "CP2",
    "P4",
    "P8",
    "PO4",
    "O2",
]
PERIPHERAL_CHANNELS = [
    "hEOG",
    "vEOG",
    "zEMG",
    "tEMG",
    "GSR",
    "Respiration",
    "Plethysmograph",
    "Temperature",
]
ALL_CHANNELS = EEG_CHANNELS + PERIPHERAL_CHANNELS
LABEL_COLUMNS = ["valence", "arousal", "dominance", "liking"]
