"""Class names of the three detectors, indexed by effdet's 1-based class id.

effdet predicts ``class index + 1``; for the COCO model that is the COCO category id (1..90),
with the ten ids the COCO annotations never use named ``N/A`` (as torchvision does).
"""

COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "N/A", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "N/A", "backpack",
    "umbrella", "N/A", "N/A", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "N/A", "wine glass", "cup", "fork", "knife", "spoon", "bowl",
    "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut",
    "cake", "chair", "couch", "potted plant", "bed", "N/A", "dining table", "N/A", "N/A",
    "toilet", "N/A", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave",
    "oven", "toaster", "sink", "refrigerator", "N/A", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)

AQUARIUM_CLASSES = ("fish", "jellyfish", "penguin", "puffin", "shark", "starfish", "stingray")

VEHICLE_CLASSES = (
    "car", "truck", "bus", "motorcycle", "bicycle", "van", "taxi", "ambulance", "fire truck",
    "police car", "pickup truck", "suv", "trailer", "tractor", "scooter", "tram", "train",
    "boat", "airplane", "helicopter",
)

assert len(COCO_CLASSES) == 90 and len(AQUARIUM_CLASSES) == 7 and len(VEHICLE_CLASSES) == 20


def label_for(class_names, class_id: int) -> str:
    """Name of effdet's 1-based ``class_id``; ids outside the table raise ValueError."""
    if not 1 <= class_id <= len(class_names):
        raise ValueError(f"class id {class_id} outside 1..{len(class_names)}")
    return class_names[class_id - 1]
