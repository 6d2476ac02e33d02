//! The blocks this server runs: each block type's id and aliases, its fields (kinds,
//! defaults, bounds), its outputs and how it changes dimensionality. `spec` compiles a
//! step against this table, `exec` runs it, and `/workflows/blocks/describe` and
//! `/workflows/definition/schema` describe it in the reference's shape.

use serde_json::{json, Map, Value as Json};

use crate::model::repository::TaskType;

/// What a block does (its implementation in `exec`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Model(TaskType, bool),
    DynamicCrop,
    AbsoluteStaticCrop,
    RelativeStaticCrop,
    DetectionsFilter,
    DetectionsTransformation,
    DetectionOffset,
    PropertyDefinition,
    Expression,
    ContinueIf,
    DimensionCollapse,
    BoundingBox,
    Label,
    /// `image_slicer`: v2 (same-size tiles) or v1.
    ImageSlicer(bool),
    DetectionsStitch,
    DetectionsConsensus,
    ClassesReplacement,
    Mask,
    Polygon,
    CropVisualization,
    ClassificationLabel,
}

/// A field's default: required, or a JSON literal.
#[derive(Debug, Clone, Copy)]
pub enum Dflt {
    Required,
    Is(&'static str),
}

/// One field of a block's manifest.
#[derive(Debug, Clone, Copy)]
pub struct FieldSpec {
    pub name: &'static str,
    /// Kinds a selector given here may carry (`*`: any).
    pub kinds: &'static [&'static str],
    pub default: Dflt,
    /// Inclusive bounds of a number given literally.
    pub range: Option<(f64, f64)>,
    /// Takes a selector (not only a literal); the data may be batch-oriented.
    pub selector: bool,
}

const fn f(name: &'static str, kinds: &'static [&'static str], default: Dflt) -> FieldSpec {
    FieldSpec {
        name,
        kinds,
        default,
        range: None,
        selector: true,
    }
}

const fn bounded(name: &'static str, default: Dflt, lo: f64, hi: f64) -> FieldSpec {
    FieldSpec {
        name,
        kinds: &["float_zero_to_one", "float"],
        default,
        range: Some((lo, hi)),
        selector: true,
    }
}

/// A literal-only field (UQL definitions, step lists).
const fn lit(name: &'static str, default: Dflt) -> FieldSpec {
    FieldSpec {
        name,
        kinds: &[],
        default,
        range: None,
        selector: false,
    }
}

use Dflt::{Is, Required};

const IMAGES: FieldSpec = f("images", &["image"], Required);
const IMAGE: FieldSpec = f("image", &["image"], Required);
const DETS: &[&str] = &[
    "object_detection_prediction",
    "instance_segmentation_prediction",
    "keypoint_detection_prediction",
];
const PREDICTIONS: FieldSpec = f("predictions", DETS, Required);
const MODEL_ID: FieldSpec = f("model_id", &["roboflow_model_id"], Required);
const CONFIDENCE: FieldSpec = bounded("confidence", Is("0.4"), 0.0, 1.0);
const ACTIVE_LEARNING: [FieldSpec; 2] = [
    f("disable_active_learning", &["boolean"], Is("true")),
    f(
        "active_learning_target_dataset",
        &["roboflow_project"],
        Is("null"),
    ),
];

const DETECTION_FIELDS: &[FieldSpec] = &[
    IMAGES,
    MODEL_ID,
    CONFIDENCE,
    f("class_filter", &["list_of_values"], Is("null")),
    bounded("iou_threshold", Is("0.3"), 0.0, 1.0),
    f("max_detections", &["integer"], Is("300")),
    f("class_agnostic_nms", &["boolean"], Is("false")),
    f("max_candidates", &["integer"], Is("3000")),
    ACTIVE_LEARNING[0],
    ACTIVE_LEARNING[1],
];
const DETECTION_V3_FIELDS: &[FieldSpec] = &[
    IMAGES,
    MODEL_ID,
    f("confidence_mode", &["string"], Is("\"best\"")),
    bounded("custom_confidence", Is("0.4"), 0.0, 1.0),
    f("class_filter", &["list_of_values"], Is("null")),
    bounded("iou_threshold", Is("0.3"), 0.0, 1.0),
    f("max_detections", &["integer"], Is("300")),
    f("class_agnostic_nms", &["boolean"], Is("false")),
    f("max_candidates", &["integer"], Is("3000")),
    ACTIVE_LEARNING[0],
    ACTIVE_LEARNING[1],
];
const SEGMENTATION_FIELDS: &[FieldSpec] = &[
    IMAGES,
    MODEL_ID,
    CONFIDENCE,
    f("class_filter", &["list_of_values"], Is("null")),
    bounded("iou_threshold", Is("0.3"), 0.0, 1.0),
    f("max_detections", &["integer"], Is("300")),
    f("class_agnostic_nms", &["boolean"], Is("false")),
    f("max_candidates", &["integer"], Is("3000")),
    f("mask_decode_mode", &["string"], Is("\"accurate\"")),
    bounded("tradeoff_factor", Is("0.0"), 0.0, 1.0),
    ACTIVE_LEARNING[0],
    ACTIVE_LEARNING[1],
];
const KEYPOINT_FIELDS: &[FieldSpec] = &[
    IMAGES,
    MODEL_ID,
    CONFIDENCE,
    f("class_filter", &["list_of_values"], Is("null")),
    bounded("iou_threshold", Is("0.3"), 0.0, 1.0),
    f("max_detections", &["integer"], Is("300")),
    f("class_agnostic_nms", &["boolean"], Is("false")),
    f("max_candidates", &["integer"], Is("3000")),
    bounded("keypoint_confidence", Is("0.0"), 0.0, 1.0),
    ACTIVE_LEARNING[0],
    ACTIVE_LEARNING[1],
];
const CLASSIFICATION_FIELDS: &[FieldSpec] = &[
    IMAGES,
    MODEL_ID,
    CONFIDENCE,
    ACTIVE_LEARNING[0],
    ACTIVE_LEARNING[1],
];

const VIS_COMMON: [FieldSpec; 7] = [
    IMAGE,
    PREDICTIONS,
    f("copy_image", &["boolean"], Is("true")),
    f("color_palette", &["string"], Is("\"DEFAULT\"")),
    f("palette_size", &["integer"], Is("10")),
    f("custom_colors", &["list_of_values"], Is("[]")),
    f("color_axis", &["string"], Is("\"CLASS\"")),
];

/// The text fields of the label visualisations.
const TEXT_FIELDS: [FieldSpec; 7] = [
    f("text", &["string"], Is("\"Class\"")),
    f("text_position", &["string"], Is("\"TOP_LEFT\"")),
    f("text_color", &["string"], Is("\"WHITE\"")),
    f("text_scale", &["float"], Is("1.0")),
    f("text_thickness", &["integer"], Is("1")),
    f("text_padding", &["integer"], Is("10")),
    f("border_radius", &["integer"], Is("0")),
];

/// A detections visualisation's fields: the common ones, then its own.
macro_rules! vis_fields {
    ($($own:expr),* $(,)?) => {
        &[
            VIS_COMMON[0],
            VIS_COMMON[1],
            VIS_COMMON[2],
            VIS_COMMON[3],
            VIS_COMMON[4],
            VIS_COMMON[5],
            VIS_COMMON[6],
            $($own),*
        ]
    };
}

/// A label visualisation's fields: the common ones with `predictions` of its kind, then
/// the text fields.
macro_rules! label_fields {
    ($predictions:expr) => {
        &[
            VIS_COMMON[0],
            $predictions,
            VIS_COMMON[2],
            VIS_COMMON[3],
            VIS_COMMON[4],
            VIS_COMMON[5],
            VIS_COMMON[6],
            TEXT_FIELDS[0],
            TEXT_FIELDS[1],
            TEXT_FIELDS[2],
            TEXT_FIELDS[3],
            TEXT_FIELDS[4],
            TEXT_FIELDS[5],
            TEXT_FIELDS[6],
        ]
    };
}

const OPS_FIELDS: &[FieldSpec] = &[
    PREDICTIONS,
    lit("operations", Required),
    lit("operations_parameters", Is("{}")),
];

/// A block type.
#[derive(Debug)]
pub struct BlockType {
    pub id: &'static str,
    pub aliases: &'static [&'static str],
    pub name: &'static str,
    pub description: &'static str,
    pub kind: Kind,
    pub fields: &'static [FieldSpec],
    /// Outputs: name and kind.
    pub outputs: &'static [(&'static str, &'static str)],
    /// Output dimensionality relative to the step's inputs.
    pub dim_offset: i8,
}

const fn model(
    id: &'static str,
    aliases: &'static [&'static str],
    name: &'static str,
    task: TaskType,
    multi: bool,
    fields: &'static [FieldSpec],
    outputs: &'static [(&'static str, &'static str)],
) -> BlockType {
    BlockType {
        id,
        aliases,
        name,
        description: "Runs a Roboflow model on the images, through the server's batching pipeline.",
        kind: Kind::Model(task, multi),
        fields,
        outputs,
        dim_offset: 0,
    }
}

const OD_OUT: &[(&str, &str)] = &[
    ("inference_id", "string"),
    ("predictions", "object_detection_prediction"),
];
const OD_OUT2: &[(&str, &str)] = &[
    ("inference_id", "inference_id"),
    ("predictions", "object_detection_prediction"),
    ("model_id", "roboflow_model_id"),
];
const IS_OUT: &[(&str, &str)] = &[
    ("inference_id", "string"),
    ("predictions", "instance_segmentation_prediction"),
];
const IS_OUT2: &[(&str, &str)] = &[
    ("inference_id", "inference_id"),
    ("predictions", "instance_segmentation_prediction"),
    ("model_id", "roboflow_model_id"),
];
const KP_OUT: &[(&str, &str)] = &[
    ("inference_id", "string"),
    ("predictions", "keypoint_detection_prediction"),
];
const KP_OUT2: &[(&str, &str)] = &[
    ("inference_id", "inference_id"),
    ("predictions", "keypoint_detection_prediction"),
    ("model_id", "roboflow_model_id"),
];
const CLS_OUT: &[(&str, &str)] = &[
    ("inference_id", "string"),
    ("predictions", "classification_prediction"),
];
const CLS_OUT2: &[(&str, &str)] = &[
    ("inference_id", "inference_id"),
    ("predictions", "classification_prediction"),
    ("model_id", "roboflow_model_id"),
];

use TaskType::{
    Classification as Cls, InstanceSegmentation as Is_, KeypointDetection as Kp,
    ObjectDetection as Od,
};

/// Every block this server has.
pub static BLOCKS: &[BlockType] = &[
    model(
        "roboflow_core/roboflow_object_detection_model@v1",
        &["RoboflowObjectDetectionModel", "ObjectDetectionModel"],
        "Object Detection Model",
        Od,
        false,
        DETECTION_FIELDS,
        OD_OUT,
    ),
    model(
        "roboflow_core/roboflow_object_detection_model@v2",
        &[],
        "Object Detection Model",
        Od,
        false,
        DETECTION_FIELDS,
        OD_OUT2,
    ),
    model(
        "roboflow_core/roboflow_object_detection_model@v3",
        &[],
        "Object Detection Model",
        Od,
        false,
        DETECTION_V3_FIELDS,
        OD_OUT2,
    ),
    model(
        "roboflow_core/roboflow_instance_segmentation_model@v1",
        &[
            "RoboflowInstanceSegmentationModel",
            "InstanceSegmentationModel",
        ],
        "Instance Segmentation Model",
        Is_,
        false,
        SEGMENTATION_FIELDS,
        IS_OUT,
    ),
    model(
        "roboflow_core/roboflow_instance_segmentation_model@v2",
        &[],
        "Instance Segmentation Model",
        Is_,
        false,
        SEGMENTATION_FIELDS,
        IS_OUT2,
    ),
    model(
        "roboflow_core/roboflow_instance_segmentation_model@v3",
        &[],
        "Instance Segmentation Model",
        Is_,
        false,
        SEGMENTATION_FIELDS,
        IS_OUT2,
    ),
    model(
        "roboflow_core/roboflow_instance_segmentation_model@v4",
        &[],
        "Instance Segmentation Model",
        Is_,
        false,
        SEGMENTATION_FIELDS,
        IS_OUT2,
    ),
    model(
        "roboflow_core/roboflow_keypoint_detection_model@v1",
        &["RoboflowKeypointDetectionModel", "KeypointsDetectionModel"],
        "Keypoint Detection Model",
        Kp,
        false,
        KEYPOINT_FIELDS,
        KP_OUT,
    ),
    model(
        "roboflow_core/roboflow_keypoint_detection_model@v2",
        &[],
        "Keypoint Detection Model",
        Kp,
        false,
        KEYPOINT_FIELDS,
        KP_OUT2,
    ),
    model(
        "roboflow_core/roboflow_keypoint_detection_model@v3",
        &[],
        "Keypoint Detection Model",
        Kp,
        false,
        KEYPOINT_FIELDS,
        KP_OUT2,
    ),
    model(
        "roboflow_core/roboflow_classification_model@v1",
        &["RoboflowClassificationModel", "ClassificationModel"],
        "Single-Label Classification Model",
        Cls,
        false,
        CLASSIFICATION_FIELDS,
        CLS_OUT,
    ),
    model(
        "roboflow_core/roboflow_classification_model@v2",
        &[],
        "Single-Label Classification Model",
        Cls,
        false,
        CLASSIFICATION_FIELDS,
        CLS_OUT2,
    ),
    model(
        "roboflow_core/roboflow_classification_model@v3",
        &[],
        "Single-Label Classification Model",
        Cls,
        false,
        CLASSIFICATION_FIELDS,
        CLS_OUT2,
    ),
    model(
        "roboflow_core/roboflow_multi_label_classification_model@v1",
        &[
            "RoboflowMultiLabelClassificationModel",
            "MultiLabelClassificationModel",
        ],
        "Multi-Label Classification Model",
        Cls,
        true,
        CLASSIFICATION_FIELDS,
        CLS_OUT,
    ),
    model(
        "roboflow_core/roboflow_multi_label_classification_model@v2",
        &[],
        "Multi-Label Classification Model",
        Cls,
        true,
        CLASSIFICATION_FIELDS,
        CLS_OUT2,
    ),
    model(
        "roboflow_core/roboflow_multi_label_classification_model@v3",
        &[],
        "Multi-Label Classification Model",
        Cls,
        true,
        CLASSIFICATION_FIELDS,
        CLS_OUT2,
    ),
    BlockType {
        id: "roboflow_core/dynamic_crop@v1",
        aliases: &["DynamicCrop", "Crop"],
        name: "Dynamic Crop",
        description: "Crops each detection's box out of its image (one nesting level deeper).",
        kind: Kind::DynamicCrop,
        fields: &[
            IMAGES,
            PREDICTIONS,
            bounded("mask_opacity", Is("0.0"), 0.0, 1.0),
            f("background_color", &["string"], Is("\"(0, 0, 0)\"")),
        ],
        outputs: &[
            ("crops", "image"),
            ("predictions", "object_detection_prediction"),
        ],
        dim_offset: 1,
    },
    BlockType {
        id: "roboflow_core/absolute_static_crop@v1",
        aliases: &["AbsoluteStaticCrop"],
        name: "Absolute Static Crop",
        description: "Crops a fixed rectangle (centre and size in pixels) of each image.",
        kind: Kind::AbsoluteStaticCrop,
        fields: &[
            IMAGES,
            f("x_center", &["integer"], Required),
            f("y_center", &["integer"], Required),
            f("width", &["integer"], Required),
            f("height", &["integer"], Required),
        ],
        outputs: &[("crops", "image")],
        dim_offset: 0,
    },
    BlockType {
        id: "roboflow_core/relative_statoic_crop@v1",
        aliases: &["RelativeStaticCrop"],
        name: "Relative Static Crop",
        description:
            "Crops a fixed rectangle (centre and size as fractions of the image) of each image.",
        kind: Kind::RelativeStaticCrop,
        fields: &[
            IMAGES,
            bounded("x_center", Required, 0.0, 1.0),
            bounded("y_center", Required, 0.0, 1.0),
            bounded("width", Required, 0.0, 1.0),
            bounded("height", Required, 0.0, 1.0),
        ],
        outputs: &[("crops", "image")],
        dim_offset: 0,
    },
    BlockType {
        id: "roboflow_core/detections_filter@v1",
        aliases: &["DetectionsFilter"],
        name: "Detections Filter",
        description: "Keeps the detections that satisfy a condition (UQL).",
        kind: Kind::DetectionsFilter,
        fields: OPS_FIELDS,
        outputs: &[("predictions", "object_detection_prediction")],
        dim_offset: 0,
    },
    BlockType {
        id: "roboflow_core/detections_transformation@v1",
        aliases: &["DetectionsTransformation"],
        name: "Detections Transformation",
        description:
            "Applies a chain of UQL operations to detections (filter, sort, offset, rename).",
        kind: Kind::DetectionsTransformation,
        fields: OPS_FIELDS,
        outputs: &[("predictions", "object_detection_prediction")],
        dim_offset: 0,
    },
    BlockType {
        id: "roboflow_core/detection_offset@v1",
        aliases: &["DetectionOffset"],
        name: "Detection Offset",
        description: "Grows each box by a width and height (pixels or percent), with new ids.",
        kind: Kind::DetectionOffset,
        fields: &[
            PREDICTIONS,
            f("offset_width", &["integer"], Required),
            f("offset_height", &["integer"], Required),
            f("units", &["string"], Is("\"Pixels\"")),
        ],
        outputs: &[("predictions", "object_detection_prediction")],
        dim_offset: 0,
    },
    BlockType {
        id: "roboflow_core/property_definition@v1",
        aliases: &["PropertyDefinition", "PropertyExtraction"],
        name: "Property Definition",
        description: "Computes a value from data with a UQL operation chain.",
        kind: Kind::PropertyDefinition,
        fields: &[f("data", &["*"], Required), lit("operations", Required)],
        outputs: &[("output", "*")],
        dim_offset: 0,
    },
    BlockType {
        id: "roboflow_core/expression@v1",
        aliases: &[],
        name: "Expression",
        description: "Chooses a result by the first matching case of a switch (UQL).",
        kind: Kind::Expression,
        fields: &[
            lit("data", Required),
            lit("data_operations", Is("{}")),
            lit("switch", Required),
        ],
        outputs: &[("output", "*")],
        dim_offset: 0,
    },
    BlockType {
        id: "roboflow_core/continue_if@v1",
        aliases: &["ContinueIf"],
        name: "Continue If",
        description: "Runs its next steps only for the elements whose condition holds.",
        kind: Kind::ContinueIf,
        fields: &[
            lit("condition_statement", Required),
            lit("evaluation_parameters", Is("{}")),
            lit("next_steps", Required),
            f("stop_delay", &["float"], Is("0")),
        ],
        outputs: &[],
        dim_offset: 0,
    },
    BlockType {
        id: "roboflow_core/dimension_collapse@v1",
        aliases: &["DimensionCollapse"],
        name: "Dimension Collapse",
        description: "Gathers nested data (one value per crop) into one list per parent element.",
        kind: Kind::DimensionCollapse,
        fields: &[f("data", &["*"], Required)],
        outputs: &[("output", "list_of_values")],
        dim_offset: -1,
    },
    BlockType {
        id: "roboflow_core/bounding_box_visualization@v1",
        aliases: &["BoundingBoxVisualization"],
        name: "Bounding Box Visualization",
        description: "Draws the detections' boxes on the image.",
        kind: Kind::BoundingBox,
        fields: &[
            VIS_COMMON[0],
            VIS_COMMON[1],
            VIS_COMMON[2],
            VIS_COMMON[3],
            VIS_COMMON[4],
            VIS_COMMON[5],
            VIS_COMMON[6],
            f("thickness", &["integer"], Is("2")),
            bounded("roundness", Is("0.0"), 0.0, 1.0),
        ],
        outputs: &[("image", "image")],
        dim_offset: 0,
    },
    BlockType {
        id: "roboflow_core/label_visualization@v1",
        aliases: &["LabelVisualization"],
        name: "Label Visualization",
        description: "Writes each detection's label on the image.",
        kind: Kind::Label,
        fields: label_fields!(VIS_COMMON[1]),
        outputs: &[("image", "image")],
        dim_offset: 0,
    },
    slicer("roboflow_core/image_slicer@v1", false, "Slices each image into overlapping tiles (border tiles cut at the edge), one nesting level deeper."),
    slicer("roboflow_core/image_slicer@v2", true, "Slices each image into overlapping tiles of the same size (border tiles moved inwards, repeats dropped), one nesting level deeper."),
    BlockType {
        id: "roboflow_core/detections_stitch@v1",
        aliases: &[],
        name: "Detections Stitch",
        description: "Merges the detections of an image's tiles (or crops) into the image's coordinates, overlaps reconciled by NMS or NMM.",
        kind: Kind::DetectionsStitch,
        fields: &[
            f("reference_image", &["image"], Required),
            f("predictions", &["object_detection_prediction", "instance_segmentation_prediction"], Required),
            f("overlap_filtering_strategy", &["string"], Is("\"nms\"")),
            bounded("iou_threshold", Is("0.3"), 0.0, 1.0),
        ],
        outputs: &[("predictions", "object_detection_prediction")],
        dim_offset: -1,
    },
    BlockType {
        id: "roboflow_core/detections_consensus@v1",
        aliases: &["DetectionsConsensus"],
        name: "Detections Consensus",
        description: "Keeps the objects that enough of several models' detections agree on, merged.",
        kind: Kind::DetectionsConsensus,
        fields: &[
            lit("predictions_batches", Required),
            f("required_votes", &["integer"], Required),
            f("class_aware", &["boolean"], Is("true")),
            bounded("iou_threshold", Is("0.3"), 0.0, 1.0),
            bounded("confidence", Is("0.0"), 0.0, 1.0),
            f("classes_to_consider", &["list_of_values"], Is("null")),
            f("required_objects", &["integer", "dictionary"], Is("null")),
            lit("presence_confidence_aggregation", Is("\"max\"")),
            lit("detections_merge_confidence_aggregation", Is("\"average\"")),
            lit("detections_merge_coordinates_aggregation", Is("\"average\"")),
            lit("detections_merge_mask_aggregation", Is("\"union\"")),
        ],
        outputs: &[
            ("predictions", "object_detection_prediction"),
            ("object_present", "boolean"),
            ("presence_confidence", "dictionary"),
        ],
        dim_offset: 0,
    },
    BlockType {
        id: "roboflow_core/detections_classes_replacement@v1",
        aliases: &["DetectionsClassesReplacement"],
        name: "Detections Classes Replacement",
        description: "Gives each detection the top class of the classification of its crop.",
        kind: Kind::ClassesReplacement,
        fields: &[
            f("object_detection_predictions", DETS, Required),
            f("classification_predictions", &["classification_prediction", "string", "list_of_values"], Required),
            f("fallback_class_name", &["string"], Is("null")),
            f("fallback_class_id", &["integer"], Is("null")),
        ],
        outputs: &[("predictions", "object_detection_prediction")],
        dim_offset: -1,
    },
    visual(
        "roboflow_core/mask_visualization@v1",
        &["MaskVisualization"],
        "Mask Visualization",
        "Fills each instance's mask with its colour.",
        Kind::Mask,
        vis_fields![bounded("opacity", Is("0.5"), 0.0, 1.0)],
    ),
    visual(
        "roboflow_core/polygon_visualization@v1",
        &["PolygonVisualization"],
        "Polygon Visualization",
        "Outlines each instance's polygon.",
        Kind::Polygon,
        vis_fields![f("thickness", &["integer"], Is("2"))],
    ),
    visual(
        "roboflow_core/crop_visualization@v1",
        &["CropVisualization"],
        "Crop Visualization",
        "Shows each detection's crop, scaled, next to its box.",
        Kind::CropVisualization,
        vis_fields![
            f("position", &["string"], Is("\"TOP_CENTER\"")),
            f("scale_factor", &["float"], Is("2.0")),
            f("border_thickness", &["integer"], Is("2")),
        ],
    ),
    BlockType {
        id: "roboflow_core/classification_label_visualization@v1",
        aliases: &[],
        name: "Classification Label Visualization",
        description: "Writes the image's classification (top class, or every predicted class) on it.",
        kind: Kind::ClassificationLabel,
        fields: label_fields!(f("predictions", &["classification_prediction"], Required)),
        outputs: &[("image", "image")],
        dim_offset: 0,
    },
];

const SLICER_FIELDS: &[FieldSpec] = &[
    IMAGE,
    f("slice_width", &["integer"], Is("640")),
    f("slice_height", &["integer"], Is("640")),
    bounded("overlap_ratio_width", Is("0.2"), 0.0, 1.0),
    bounded("overlap_ratio_height", Is("0.2"), 0.0, 1.0),
];

const fn slicer(id: &'static str, v2: bool, description: &'static str) -> BlockType {
    BlockType {
        id,
        aliases: &[],
        name: "Image Slicer",
        description,
        kind: Kind::ImageSlicer(v2),
        fields: SLICER_FIELDS,
        outputs: &[("slices", "image")],
        dim_offset: 1,
    }
}

/// A detections visualisation: the common fields, then its own.
const fn visual(
    id: &'static str,
    aliases: &'static [&'static str],
    name: &'static str,
    description: &'static str,
    kind: Kind,
    own: &'static [FieldSpec],
) -> BlockType {
    // `own`: the common fields (vis_fields!) and the block's.
    BlockType {
        id,
        aliases,
        name,
        description,
        kind,
        fields: own,
        outputs: &[("image", "image")],
        dim_offset: 0,
    }
}

/// Block types of Roboflow's that run client-supplied code or send data elsewhere: refused
/// by name.
pub const REFUSED: &[&str] = &[
    "roboflow_core/custom_python@v1",
    "roboflow_core/inner_workflow@v1",
    "roboflow_core/webhook_sink@v1",
    "roboflow_core/email_notification@v1",
    "roboflow_core/email_notification@v2",
    "roboflow_core/local_file_sink@v1",
    "roboflow_core/roboflow_dataset_upload@v1",
    "roboflow_core/roboflow_dataset_upload@v2",
    "roboflow_core/roboflow_custom_metadata@v1",
    "roboflow_core/model_monitoring_inference_aggregator@v1",
    "roboflow_core/twilio_sms_notification@v1",
    "roboflow_core/slack_notification@v1",
    "roboflow_core/opc_writer_sink@v1",
    "roboflow_core/modbus_tcp@v1",
    "RoboflowDatasetUpload",
];

/// The block a step's `type` names (its id or an alias).
pub fn find(type_id: &str) -> Option<&'static BlockType> {
    BLOCKS
        .iter()
        .find(|b| b.id == type_id || b.aliases.contains(&type_id))
}

/// Every tag a step's `type` may be, as the reference's error lists them.
pub fn all_tags() -> String {
    BLOCKS
        .iter()
        .flat_map(|b| std::iter::once(b.id).chain(b.aliases.iter().copied()))
        .map(|t| format!("'{t}'"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn kind_json(k: &str) -> Json {
    json!({"name": k, "description": kind_description(k), "docs": null})
}

fn kind_description(k: &str) -> &'static str {
    match k {
        "image" => "Image in workflows",
        "object_detection_prediction" => "Prediction with detected bounding boxes in form of sv.Detections(...) object",
        "instance_segmentation_prediction" => "Prediction with detected bounding boxes and segmentation masks in form of sv.Detections(...) object",
        "keypoint_detection_prediction" => "Prediction with detected bounding boxes and detected keypoints in form of sv.Detections(...) object",
        "classification_prediction" => "Predictions from classifier",
        "roboflow_model_id" => "Roboflow model id",
        "string" => "String value",
        "integer" => "Integer value",
        "float" => "Float value",
        "float_zero_to_one" => "`float` value in range `[0.0, 1.0]`",
        "boolean" => "Boolean flag",
        "list_of_values" => "List of values of any type",
        "inference_id" => "Inference identifier",
        "roboflow_project" => "Roboflow project name",
        "dictionary" => "Dictionary",
        _ => "Equivalent of any element",
    }
}

/// Every kind the blocks use.
pub fn kinds() -> Vec<&'static str> {
    let mut all: Vec<&'static str> = BLOCKS
        .iter()
        .flat_map(|b| {
            b.fields
                .iter()
                .flat_map(|f| f.kinds.iter().copied())
                .chain(b.outputs.iter().map(|o| o.1))
        })
        .chain(["*", "dictionary"])
        .collect();
    all.sort_unstable();
    all.dedup();
    all
}

/// The JSON schema of a block's manifest (what Roboflow's builder reads).
pub fn block_schema(b: &BlockType) -> Json {
    let mut props = Map::new();
    let mut tags: Vec<&str> = vec![b.id];
    tags.extend(b.aliases);
    props.insert(
        "type".into(),
        json!({"enum": tags, "title": "Type", "type": "string"}),
    );
    props.insert("name".into(), json!({"title": "Step Name", "type": "string", "description": "Enter a unique identifier for this step."}));
    let mut required = vec!["type", "name"];
    for field in b.fields {
        let mut p = Map::new();
        p.insert("title".into(), json!(field.name.replace('_', " ")));
        if field.selector {
            p.insert(
                "kind".into(),
                Json::Array(field.kinds.iter().map(|k| kind_json(k)).collect()),
            );
        }
        if let Some((lo, hi)) = field.range {
            p.insert("minimum".into(), json!(lo));
            p.insert("maximum".into(), json!(hi));
        }
        match field.default {
            Required => required.push(field.name),
            Is(d) => {
                p.insert(
                    "default".into(),
                    serde_json::from_str(d).unwrap_or(Json::Null),
                );
            }
        }
        props.insert(field.name.into(), Json::Object(p));
    }
    json!({
        "title": b.name,
        "description": b.description,
        "type": "object",
        "properties": props,
        "required": required,
        "additionalProperties": true,
    })
}

/// A block as `/workflows/blocks/describe` lists it.
pub fn describe(b: &BlockType) -> Json {
    let batch = |name: &str| matches!(name, "images" | "image" | "predictions");
    json!({
        "block_schema": block_schema(b),
        "outputs_manifest": b.outputs.iter().map(|(n, k)| json!({"name": n, "kind": [kind_json(k)]})).collect::<Vec<_>>(),
        "block_source": "workflows_core",
        "fully_qualified_block_class_name": format!("cvserve::workflows::{}", b.id),
        "human_friendly_block_name": b.name,
        "manifest_type_identifier": b.id,
        "manifest_type_identifier_aliases": b.aliases,
        "execution_engine_compatibility": ">=1.3.0,<2.0.0",
        "input_dimensionality_offsets": b.fields.iter().filter(|f| batch(f.name)).map(|f| (f.name.to_owned(), json!(0))).collect::<Map<_, _>>(),
        "dimensionality_reference_property": b.fields.iter().find(|f| batch(f.name)).map(|f| f.name),
        "output_dimensionality_offset": b.dim_offset,
        "restrictions": null,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every tag resolves to exactly one block, and every literal default parses.
    #[test]
    fn tags_are_unique_and_defaults_parse() {
        let mut seen = std::collections::HashSet::new();
        for b in BLOCKS {
            for t in std::iter::once(b.id).chain(b.aliases.iter().copied()) {
                assert!(seen.insert(t), "{t} twice");
                assert_eq!(find(t).unwrap().id, b.id);
            }
            for f in b.fields {
                if let Is(d) = f.default {
                    serde_json::from_str::<Json>(d)
                        .unwrap_or_else(|e| panic!("{} {}: {e}", b.id, f.name));
                }
            }
        }
        assert!(find("roboflow_core/does_not_exist@v1").is_none());
    }
}
