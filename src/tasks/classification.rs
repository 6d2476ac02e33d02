//! Classification: one image's `[nc]` output in, Roboflow's single-label (sorted predictions,
//! `top`, `confidence`) or multi-label (every class, `predicted_classes`) answer out.
//! Scores are probabilities: softmax (single-label) or sigmoid (multi-label) is applied to
//! logits, and not applied again to an output that already is probabilities.

use std::collections::BTreeMap;

use serde::Serialize;

/// Per-request settings of classification.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassificationParams {
    pub confidence: f32,
}

/// One class of a single-label answer.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct ClassPrediction {
    #[serde(rename = "class")]
    pub class_name: String,
    pub class_id: usize,
    pub confidence: f32,
}

/// One class of a multi-label answer.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct LabelScore {
    pub confidence: f32,
    pub class_id: usize,
}

/// The task-specific fields of a classification response.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
#[serde(untagged)]
pub enum ClassificationOutput {
    SingleLabel {
        predictions: Vec<ClassPrediction>,
        top: String,
        confidence: f32,
    },
    MultiLabel {
        predictions: BTreeMap<String, LabelScore>,
        predicted_classes: Vec<String>,
    },
}

impl ClassificationOutput {
    /// How many classes the answer lists.
    pub fn class_count(&self) -> usize {
        match self {
            ClassificationOutput::SingleLabel { predictions, .. } => predictions.len(),
            ClassificationOutput::MultiLabel { predictions, .. } => predictions.len(),
        }
    }
}

fn round4(v: f32) -> f32 {
    (v * 10_000.0).round() / 10_000.0
}

fn is_distribution(v: &[f32]) -> bool {
    v.iter().all(|x| (0.0..=1.0).contains(x)) && (v.iter().sum::<f32>() - 1.0).abs() < 1e-3
}

/// What turns a model's outputs into probabilities, decided once per model at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// The graph ends in Softmax/Sigmoid: its outputs are probabilities already.
    None,
    Softmax,
    Sigmoid,
}

impl Activation {
    /// Decides from probe outputs (rows of `[nc]` from different inputs) of a model: outputs
    /// that are probabilities for every probe came through the graph's own Softmax
    /// (single-label: each row sums to one) or Sigmoid (multi-label: every value in [0, 1]);
    /// anything else is logits.
    pub fn from_probes<'a>(rows: impl IntoIterator<Item = &'a [f32]>, multi_label: bool) -> Self {
        let mut rows = rows.into_iter().peekable();
        let probabilities = rows.peek().is_some()
            && rows.all(|r| {
                if multi_label {
                    r.iter().all(|x| (0.0..=1.0).contains(x))
                } else {
                    is_distribution(r)
                }
            });
        match (probabilities, multi_label) {
            (true, _) => Activation::None,
            (false, false) => Activation::Softmax,
            (false, true) => Activation::Sigmoid,
        }
    }

    fn apply(self, v: &[f32]) -> Vec<f32> {
        match self {
            Activation::None => v.to_vec(),
            Activation::Sigmoid => v.iter().map(|s| 1.0 / (1.0 + (-s).exp())).collect(),
            Activation::Softmax => softmax(v),
        }
    }
}

/// Softmax of logits.
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.iter().map(|v| (v - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    exp.into_iter().map(|e| e / sum).collect()
}

/// Single-label answer: classes scoring at least `confidence`, best first.
pub fn single_label(
    logits: &[f32],
    activation: Activation,
    class_names: &[String],
    params: &ClassificationParams,
) -> ClassificationOutput {
    let probs = activation.apply(logits);
    let mut predictions: Vec<ClassPrediction> = probs
        .iter()
        .enumerate()
        .filter(|(_, &p)| p >= params.confidence)
        .filter_map(|(i, &p)| {
            Some(ClassPrediction {
                class_name: class_names.get(i)?.clone(),
                class_id: i,
                confidence: round4(p),
            })
        })
        .collect();
    predictions.sort_by(|a, b| b.confidence.total_cmp(&a.confidence));
    let (top, confidence) = predictions
        .first()
        .map(|p| (p.class_name.clone(), p.confidence))
        .unwrap_or_default();
    ClassificationOutput::SingleLabel {
        predictions,
        top,
        confidence,
    }
}

/// Multi-label answer: every class's score, and the classes scoring above `confidence`.
pub fn multi_label(
    scores: &[f32],
    activation: Activation,
    class_names: &[String],
    params: &ClassificationParams,
) -> ClassificationOutput {
    let probs = activation.apply(scores);
    let mut predictions = BTreeMap::new();
    let mut predicted_classes = Vec::new();
    for (i, (&p, name)) in probs.iter().zip(class_names).enumerate() {
        if p > params.confidence {
            predicted_classes.push(name.clone());
        }
        predictions.insert(
            name.clone(),
            LabelScore {
                confidence: round4(p),
                class_id: i,
            },
        );
    }
    ClassificationOutput::MultiLabel {
        predictions,
        predicted_classes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        ["cat", "dog", "fox"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    #[test]
    fn single_label_softmaxes_sorts_and_filters() {
        let out = single_label(
            &[1.0, 3.0, 0.0],
            Activation::Softmax,
            &names(),
            &ClassificationParams { confidence: 0.1 },
        );
        let ClassificationOutput::SingleLabel {
            predictions,
            top,
            confidence,
        } = out
        else {
            panic!()
        };
        assert_eq!(top, "dog");
        assert_eq!(predictions.len(), 2, "fox scores 0.04 < 0.1");
        assert_eq!(predictions[0].class_name, "dog");
        assert!((confidence - 0.8438).abs() < 1e-4, "{confidence}");
        assert!((predictions[1].confidence - 0.1142).abs() < 1e-4);
    }

    #[test]
    fn probabilities_are_not_softmaxed_twice() {
        let probe: &[f32] = &[0.7, 0.2, 0.1];
        let activation = Activation::from_probes([probe, &[0.0, 0.0, 1.0]], false);
        assert_eq!(activation, Activation::None);
        let out = single_label(
            probe,
            activation,
            &names(),
            &ClassificationParams { confidence: 0.4 },
        );
        let ClassificationOutput::SingleLabel {
            confidence, top, ..
        } = out
        else {
            panic!()
        };
        assert_eq!((top.as_str(), confidence), ("cat", 0.7));
    }

    #[test]
    fn nothing_above_the_threshold_gives_an_empty_top() {
        let out = single_label(
            &[0.0, 0.0, 0.0],
            Activation::None,
            &names(),
            &ClassificationParams { confidence: 0.5 },
        );
        assert_eq!(
            out,
            ClassificationOutput::SingleLabel {
                predictions: vec![],
                top: String::new(),
                confidence: 0.0
            }
        );
    }

    #[test]
    fn multi_label_reports_every_class() {
        let out = multi_label(
            &[2.0, -2.0, 0.1],
            Activation::Sigmoid,
            &names(),
            &ClassificationParams { confidence: 0.5 },
        );
        let ClassificationOutput::MultiLabel {
            predictions,
            predicted_classes,
        } = out
        else {
            panic!()
        };
        assert_eq!(predictions.len(), 3);
        assert_eq!(predicted_classes, vec!["cat", "fox"]);
        assert!((predictions["dog"].confidence - 0.1192).abs() < 1e-4);
        assert_eq!(predictions["fox"].class_id, 2);
    }

    #[test]
    fn activation_is_decided_from_every_probe_not_one_image() {
        // Logits that happen to fall in [0, 1] for one probe but not another are logits.
        let a: &[f32] = &[0.2, 0.9, 0.4];
        let b: &[f32] = &[1.7, -0.3, 0.4];
        assert_eq!(Activation::from_probes([a, b], true), Activation::Sigmoid);
        assert_eq!(Activation::from_probes([a, a], true), Activation::None);
        assert_eq!(Activation::from_probes([a, b], false), Activation::Softmax);
        // A multi-label model with a sigmoid gets its values as they are, whatever the image.
        let out = multi_label(
            &[0.3, 0.6, 0.9],
            Activation::None,
            &names(),
            &ClassificationParams { confidence: 0.5 },
        );
        let ClassificationOutput::MultiLabel { predictions, .. } = out else {
            panic!()
        };
        assert_eq!(predictions["cat"].confidence, 0.3);
    }
}
