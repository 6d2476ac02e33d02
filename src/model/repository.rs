//! The model repository: Roboflow's local cache layout,
//! `<root>/<dataset>/<version>/{weights.onnx, environment.json, class_names.txt, model_type.json}`.
//! A `model_id` ("dataset/version") in, the model's files and metadata out. Ids that could
//! name anything outside the root are refused before touching the filesystem.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::geometry::{Contrast, ResizeMode, StaticCrop, Steps};

/// The task a model performs, from `model_type.json`'s `project_task_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskType {
    ObjectDetection,
    InstanceSegmentation,
    Classification,
    KeypointDetection,
}

impl TaskType {
    /// Roboflow's name (`task_type` in `/model/registry`).
    pub fn as_str(self) -> &'static str {
        match self {
            TaskType::ObjectDetection => "object-detection",
            TaskType::InstanceSegmentation => "instance-segmentation",
            TaskType::Classification => "classification",
            TaskType::KeypointDetection => "keypoint-detection",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "object-detection" => Some(TaskType::ObjectDetection),
            "instance-segmentation" => Some(TaskType::InstanceSegmentation),
            "classification" => Some(TaskType::Classification),
            "keypoint-detection" => Some(TaskType::KeypointDetection),
            _ => None,
        }
    }
}

/// Why a model could not be found or read.
#[derive(Debug, thiserror::Error)]
pub enum RepositoryError {
    #[error("Invalid model_id '{0}': expected '<dataset>/<version>' made of letters, digits, '-', '_' and '.'")]
    InvalidId(String),
    #[error("Model '{0}' is not in the model repository")]
    NotFound(String),
    #[error("Model '{id}' is broken: {reason}")]
    Broken { id: String, reason: String },
}

/// What the repository says about one model.
#[derive(Debug, Clone)]
pub struct ModelMetadata {
    pub id: String,
    pub dir: PathBuf,
    pub weights: PathBuf,
    pub task: TaskType,
    pub model_type: String,
    pub class_names: Vec<String>,
    /// `PREPROCESSING.resize` size, used when the network's own input size is symbolic.
    pub resize_size: Option<(u32, u32)>,
    pub resize: ResizeMode,
    /// Whether `PREPROCESSING` has an `auto-orient` block (Roboflow only orients then).
    pub auto_orient: bool,
    /// `MULTICLASS` in environment.json (multi-label classification).
    pub multiclass: bool,
    /// `PREPROCESSING`'s static-crop, contrast and grayscale steps (those enabled).
    pub steps: Steps,
    /// Keypoint names by object class id (`keypoints_metadata.json`, keypoint models).
    pub keypoints: Vec<Vec<String>>,
    /// `COLORS` of environment.json: class name to RGB, for drawing.
    pub colors: std::collections::HashMap<String, [u8; 3]>,
}

/// Parses `#RRGGBB` (or `RRGGBB`).
pub fn parse_hex_color(s: &str) -> Option<[u8; 3]> {
    let h = s.trim().trim_start_matches('#');
    if h.len() != 6 {
        return None;
    }
    let v = u32::from_str_radix(h, 16).ok()?;
    Some([(v >> 16) as u8, (v >> 8) as u8, v as u8])
}

/// Checks that `id` is `dataset/version` with safe characters, so it cannot escape the root.
pub fn validate_id(id: &str) -> Result<(), RepositoryError> {
    let parts: Vec<&str> = id.split('/').collect();
    let ok = parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && *p != "."
                && *p != ".."
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        });
    if ok {
        Ok(())
    } else {
        Err(RepositoryError::InvalidId(id.to_string()))
    }
}

/// Lists the ids of every model directory under `root` that has a weights file.
pub fn list(root: &Path) -> Vec<String> {
    let mut ids = Vec::new();
    let Ok(datasets) = std::fs::read_dir(root) else {
        return ids;
    };
    for d in datasets.flatten() {
        let Ok(versions) = std::fs::read_dir(d.path()) else {
            continue;
        };
        for v in versions.flatten() {
            let id = format!(
                "{}/{}",
                d.file_name().to_string_lossy(),
                v.file_name().to_string_lossy()
            );
            if validate_id(&id).is_ok() && find_weights(&v.path()).is_some() {
                ids.push(id);
            }
        }
    }
    ids.sort();
    ids
}

/// Roboflow names the file `weights.onnx`, or `<arch>_weights.onnx` (YOLOv5: `yolov5s_weights.onnx`).
fn find_weights(dir: &Path) -> Option<PathBuf> {
    let plain = dir.join("weights.onnx");
    if plain.is_file() {
        return Some(plain);
    }
    let mut named: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.ends_with("weights.onnx"))
        })
        .collect();
    named.sort();
    named.into_iter().next()
}

/// Reads a model's metadata from `<root>/<id>`.
pub fn read(root: &Path, id: &str) -> Result<ModelMetadata, RepositoryError> {
    validate_id(id)?;
    let dir = root.join(id);
    if !dir.is_dir() {
        return Err(RepositoryError::NotFound(id.to_string()));
    }
    let broken = |reason: String| RepositoryError::Broken {
        id: id.to_string(),
        reason,
    };
    let weights = find_weights(&dir).ok_or_else(|| broken("no weights.onnx".into()))?;

    let model_type: Value = read_json(&dir.join("model_type.json")).map_err(broken)?;
    let task_str = model_type
        .get("project_task_type")
        .and_then(Value::as_str)
        .unwrap_or("object-detection");
    let task = TaskType::parse(task_str)
        .ok_or_else(|| broken(format!("unsupported project_task_type '{task_str}'")))?;
    let model_type_name = model_type
        .get("model_type")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();

    let env: Value = read_json(&dir.join("environment.json")).map_err(broken)?;
    let pre = match env.get("PREPROCESSING") {
        Some(Value::String(s)) => serde_json::from_str(s)
            .map_err(|e| broken(format!("environment.json PREPROCESSING is not JSON: {e}")))?,
        Some(v) => v.clone(),
        None => Value::Null,
    };
    let resize = pre.get("resize");
    let resize_enabled = resize
        .and_then(|r| r.get("enabled"))
        .and_then(Value::as_bool)
        .unwrap_or(true);
    let resize_size = resize.and_then(|r| {
        Some((
            r.get("width")?.as_u64()? as u32,
            r.get("height")?.as_u64()? as u32,
        ))
    });
    let resize_mode = if resize_enabled {
        ResizeMode::from_roboflow(resize.and_then(|r| r.get("format")).and_then(Value::as_str))
    } else {
        ResizeMode::Stretch
    };
    // COLORS: {"class": "#RRGGBB"}, as an object or a JSON string of one (like PREPROCESSING).
    let colors = match env.get("COLORS") {
        Some(Value::String(s)) => serde_json::from_str::<Value>(s).unwrap_or(Value::Null),
        Some(v) => v.clone(),
        None => Value::Null,
    };
    let colors = colors
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), parse_hex_color(v.as_str()?)?)))
                .collect()
        })
        .unwrap_or_default();
    let multiclass = env
        .get("MULTICLASS")
        .and_then(Value::as_bool)
        .unwrap_or(false);

    let class_names = match std::fs::read_to_string(dir.join("class_names.txt")) {
        Ok(text) => text
            .lines()
            .map(|l| l.trim_end_matches('\r').to_string())
            .filter(|l| !l.is_empty())
            .collect(),
        Err(_) => {
            class_map(&env).ok_or_else(|| broken("no class_names.txt and no CLASS_MAP".into()))?
        }
    };
    if class_names.is_empty() {
        return Err(broken("the model has no class names".into()));
    }

    let keypoints = if task == TaskType::KeypointDetection {
        keypoint_names(&dir.join("keypoints_metadata.json")).map_err(broken)?
    } else {
        Vec::new()
    };
    Ok(ModelMetadata {
        id: id.to_string(),
        dir,
        weights,
        task,
        model_type: model_type_name,
        colors,
        class_names,
        resize_size,
        resize: resize_mode,
        auto_orient: pre.get("auto-orient").is_some(),
        steps: steps(&pre).map_err(broken)?,
        keypoints,
        multiclass,
    })
}

/// The enabled static-crop, contrast and grayscale steps of `PREPROCESSING` (Roboflow
/// applies a step when its block exists with `"enabled": true`).
fn steps(pre: &Value) -> Result<Steps, String> {
    let enabled = |step: &str| {
        pre.get(step)
            .and_then(|b| b.get("enabled"))
            .and_then(Value::as_bool)
            .unwrap_or(false)
    };
    let mut steps = Steps::default();
    if enabled("static-crop") {
        let b = &pre["static-crop"];
        let pct = |k: &str| {
            b.get(k)
                .and_then(Value::as_f64)
                .filter(|v| (0.0..=100.0).contains(v))
                .ok_or_else(|| format!("PREPROCESSING static-crop needs {k} in percent (0 to 100)"))
        };
        let crop = StaticCrop {
            x_min: pct("x_min")?,
            y_min: pct("y_min")?,
            x_max: pct("x_max")?,
            y_max: pct("y_max")?,
        };
        if crop.x_max <= crop.x_min || crop.y_max <= crop.y_min {
            return Err("PREPROCESSING static-crop keeps no pixels (max <= min)".into());
        }
        steps.static_crop = Some(crop);
    }
    if enabled("contrast") {
        let t = pre["contrast"]
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("");
        steps.contrast = Some(Contrast::from_roboflow(t).ok_or_else(|| {
            format!("PREPROCESSING contrast type '{t}' is none of Contrast Stretching, Histogram Equalization, Adaptive Equalization")
        })?);
    }
    steps.grayscale = enabled("grayscale");
    Ok(steps)
}

/// `keypoints_metadata.json`: `[{"object_class_id": 0, "keypoints": {"0": "nose", ...}}, ...]`
/// as keypoint names by object class id.
fn keypoint_names(path: &Path) -> Result<Vec<Vec<String>>, String> {
    let v = read_json(path)?;
    let entries = v
        .as_array()
        .ok_or("keypoints_metadata.json must be a list of {object_class_id, keypoints}")?;
    let mut names: Vec<Vec<String>> = Vec::new();
    for e in entries {
        let class = e
            .get("object_class_id")
            .and_then(Value::as_u64)
            .ok_or("keypoints_metadata.json: an entry has no object_class_id")?
            as usize;
        if class > 100_000 {
            return Err("keypoints_metadata.json: object_class_id out of range".into());
        }
        let map = e
            .get("keypoints")
            .and_then(Value::as_object)
            .ok_or("keypoints_metadata.json: an entry has no keypoints object")?;
        let mut pairs: Vec<(usize, String)> = map
            .iter()
            .filter_map(|(k, v)| Some((k.parse().ok()?, v.as_str()?.to_string())))
            .collect();
        pairs.sort();
        if pairs.iter().enumerate().any(|(i, (k, _))| i != *k) {
            return Err(format!(
                "keypoints_metadata.json: the keypoints of class {class} are not numbered 0, 1, 2, ..."
            ));
        }
        if names.len() <= class {
            names.resize(class + 1, Vec::new());
        }
        names[class] = pairs.into_iter().map(|(_, n)| n).collect();
    }
    Ok(names)
}

fn read_json(path: &Path) -> Result<Value, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{} is not valid JSON: {e}", path.display()))
}

fn class_map(env: &Value) -> Option<Vec<String>> {
    let map = env.get("CLASS_MAP")?.as_object()?;
    let mut pairs: Vec<(usize, String)> = map
        .iter()
        .filter_map(|(k, v)| Some((k.parse().ok()?, v.as_str()?.to_string())))
        .collect();
    pairs.sort();
    Some(pairs.into_iter().map(|(_, v)| v).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(dir: &Path, env: &str, names: Option<&str>, task: &str, weights: &str) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("environment.json"), env).unwrap();
        if let Some(n) = names {
            std::fs::write(dir.join("class_names.txt"), n).unwrap();
        }
        std::fs::write(
            dir.join("model_type.json"),
            format!(r#"{{"project_task_type": "{task}", "model_type": "yolov8n"}}"#),
        )
        .unwrap();
        std::fs::write(dir.join(weights), b"onnx").unwrap();
    }

    fn tmp_root(name: &str) -> PathBuf {
        let root = std::env::temp_dir().join(format!("cvserve-repo-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        root
    }

    #[test]
    fn ids_that_escape_the_repository_are_refused() {
        for bad in [
            "../etc",
            "a/../../b",
            "/abs/1",
            "a",
            "a/b/c",
            "a/..",
            "a/b c",
            "",
            "a/",
        ] {
            assert!(validate_id(bad).is_err(), "{bad}");
        }
        for good in ["coco/1", "shapes-det-v5/1", "my_ds.v2/10"] {
            assert!(validate_id(good).is_ok(), "{good}");
        }
    }

    #[test]
    fn reads_roboflow_layout_with_string_preprocessing() {
        let root = tmp_root("layout");
        fixture(
            &root.join("ds/3"),
            r#"{"PREPROCESSING": "{\"auto-orient\": {\"enabled\": true}, \"resize\": {\"width\": 416, \"height\": 320, \"enabled\": true, \"format\": \"Fit (grey edges) in\"}}", "MULTICLASS": true}"#,
            Some("a\nb\n\n"),
            "classification",
            "weights.onnx",
        );
        let m = read(&root, "ds/3").unwrap();
        assert_eq!(m.task, TaskType::Classification);
        assert_eq!(m.class_names, vec!["a", "b"]);
        assert_eq!(m.resize_size, Some((416, 320)));
        assert_eq!(m.resize, ResizeMode::Letterbox { pad: 114 });
        assert!(m.auto_orient && m.multiclass);
        assert_eq!(list(&root), vec!["ds/3"]);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn preprocessing_steps_are_read_and_bad_ones_refused() {
        let root = tmp_root("pre");
        fixture(
            &root.join("ds/2"),
            r##"{"PREPROCESSING": {"static-crop": {"enabled": true, "x_min": 20, "y_min": 10, "x_max": 85, "y_max": 90}, "contrast": {"enabled": false, "type": "Contrast Stretching"}, "grayscale": {"enabled": true}}, "COLORS": "{\"a\": \"#FF0000\"}"}"##,
            Some("a\n"),
            "object-detection",
            "weights.onnx",
        );
        let m = read(&root, "ds/2").unwrap();
        assert_eq!(
            m.steps,
            Steps {
                static_crop: Some(StaticCrop {
                    x_min: 20.0,
                    y_min: 10.0,
                    x_max: 85.0,
                    y_max: 90.0
                }),
                contrast: None,
                grayscale: true,
            }
        );
        assert_eq!(m.colors.get("a"), Some(&[255, 0, 0]));
        for (i, pre) in [
            r#"{"static-crop": {"enabled": true, "x_min": 20}}"#,
            r#"{"static-crop": {"enabled": true, "x_min": 50, "y_min": 0, "x_max": 40, "y_max": 90}}"#,
            r#"{"contrast": {"enabled": true, "type": "Sharpen"}}"#,
        ]
        .iter()
        .enumerate()
        {
            let id = format!("bad/{i}");
            fixture(
                &root.join(&id),
                &format!(r#"{{"PREPROCESSING": {pre}}}"#),
                Some("a\n"),
                "object-detection",
                "weights.onnx",
            );
            let e = read(&root, &id).unwrap_err().to_string();
            assert!(e.contains("PREPROCESSING"), "{e}");
        }
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn keypoint_names_come_from_the_metadata() {
        let root = tmp_root("kp");
        let dir = root.join("pose/1");
        fixture(
            &dir,
            "{}",
            Some("a\nb\n"),
            "keypoint-detection",
            "weights.onnx",
        );
        assert!(read(&root, "pose/1")
            .unwrap_err()
            .to_string()
            .contains("keypoints_metadata.json"));
        std::fs::write(
            dir.join("keypoints_metadata.json"),
            r#"[{"object_class_id": 1, "keypoints": {"1": "tail", "0": "nose"}}, {"object_class_id": 0, "keypoints": {"0": "c"}}]"#,
        )
        .unwrap();
        let m = read(&root, "pose/1").unwrap();
        assert_eq!(m.task, TaskType::KeypointDetection);
        assert_eq!(
            m.keypoints,
            vec![vec!["c".to_string()], vec!["nose".into(), "tail".into()]]
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn falls_back_to_class_map_and_yolov5_weights_name() {
        let root = tmp_root("v5");
        fixture(
            &root.join("ds/1"),
            r#"{"PREPROCESSING": {"resize": {"width": 64, "height": 64, "format": "Stretch to"}}, "CLASS_MAP": {"1": "b", "0": "a", "10": "k"}}"#,
            None,
            "object-detection",
            "yolov5s_weights.onnx",
        );
        let m = read(&root, "ds/1").unwrap();
        assert_eq!(m.class_names, vec!["a", "b", "k"]);
        assert!(m.weights.ends_with("yolov5s_weights.onnx"));
        assert!(!m.auto_orient);
        assert_eq!(m.steps, Steps::default());
        assert_eq!(m.resize, ResizeMode::Stretch);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn colors_are_hex_rgb() {
        assert_eq!(parse_hex_color("#FF8000"), Some([255, 128, 0]));
        assert_eq!(parse_hex_color("4892ea"), Some([0x48, 0x92, 0xEA]));
        assert_eq!(parse_hex_color("zz"), None);
    }

    #[test]
    fn missing_and_broken_models_say_why() {
        let root = tmp_root("broken");
        assert!(matches!(
            read(&root, "nope/1"),
            Err(RepositoryError::NotFound(_))
        ));
        fixture(
            &root.join("ds/1"),
            "{not json",
            Some("a"),
            "object-detection",
            "weights.onnx",
        );
        let err = read(&root, "ds/1").unwrap_err();
        assert!(err.to_string().contains("environment.json"), "{err}");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
