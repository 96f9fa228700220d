"""The serving contract: signature names, input and output keys, finding names.

The exported SavedModel (`cxr_tf.export_lib`), the local PredictionService
(`serving.local_server`) and the client (`serving/client.py`) all import
these names from here. The module imports nothing, neither TensorFlow nor
cxr_tf, so the client (copied alone to a machine without cxr_tf) carries the
contract with it; `cxr_tf.data.schema` takes the finding names and the film
extensions from here.
"""

# Signatures of the exported SavedModel.
SERVING_SIGNATURE = "serving_default"  # encoded PNG/JPEG bytes -> outputs
PIXELS_SIGNATURE = "predict_pixels"  # preprocessed (B, S, S, C) float32 -> outputs
MODEL_INFO_SIGNATURE = "model_info"  # no input -> MODEL_INFO_KEYS

# Input keys.
BYTES_INPUT = "image_bytes"
PIXELS_INPUT = "pixels"

# Outputs of SERVING_SIGNATURE and PIXELS_SIGNATURE: probabilities (B, K),
# localization_maps (B, K, h, w) in [0, 1], boxes (B, K, N, 4) [x, y, w, h]
# in original pixels, box_scores (B, K, N), num_boxes (B, K).
OUTPUT_KEYS = ("probabilities", "localization_maps", "boxes", "box_scores", "num_boxes")

# Outputs of MODEL_INFO_SIGNATURE: findings (K,) strings, thresholds (K,)
# float32, and two JSON strings (preprocessing, training data).
MODEL_INFO_KEYS = ("findings", "thresholds", "preprocessing", "training_data")

# The 14 ChestX-ray14 finding names, in the order of the model outputs of a
# model trained on all of them (and of the records' label vectors).
FINDINGS = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)

# File name endings read as films (PNG, JPEG, DICOM), case-insensitive.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
