//! Execution providers (Triton's `execution_accelerators`): which ONNX Runtime provider a
//! model's sessions run on. Parsed from EXECUTION_PROVIDERS (`auto`, or a list such as
//! `tensorrt,cuda`) or Roboflow's ONNXRUNTIME_EXECUTION_PROVIDERS
//! (`[TensorrtExecutionProvider,CUDAExecutionProvider,CPUExecutionProvider]`).
//!
//! `auto` takes the best the loaded library offers and says in the log why it fell back; a
//! provider asked for by name must start, or the model fails to load with the reason (never a
//! silent CPU run).

use std::fmt;

/// A provider cvserve can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Provider {
    TensorRt,
    Cuda,
    Cpu,
}

impl Provider {
    /// ONNX Runtime's name, as `/info`, the registry, the metrics and the logs report it.
    pub fn ort_name(self) -> &'static str {
        match self {
            Provider::TensorRt => "TensorrtExecutionProvider",
            Provider::Cuda => "CUDAExecutionProvider",
            Provider::Cpu => "CPUExecutionProvider",
        }
    }

    /// Whether it runs the network on a GPU.
    pub fn is_gpu(self) -> bool {
        !matches!(self, Provider::Cpu)
    }

    fn parse(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "tensorrt" | "trt" | "tensorrtexecutionprovider" => Some(Provider::TensorRt),
            "cuda" | "cudaexecutionprovider" => Some(Provider::Cuda),
            "cpu" | "cpuexecutionprovider" => Some(Provider::Cpu),
            _ => None,
        }
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.ort_name())
    }
}

/// Providers of Roboflow's default list that this build does not offer: skipped with a
/// warning (so a copied Roboflow setting keeps working) rather than refused.
const FOREIGN: [&str; 6] = [
    "openvinoexecutionprovider",
    "coremlexecutionprovider",
    "rocmexecutionprovider",
    "dmlexecutionprovider",
    "migraphxexecutionprovider",
    "azureexecutionprovider",
];

/// What the operator asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderChoice {
    /// The best the loaded ONNX Runtime library offers: TensorRT, then CUDA, then CPU, each
    /// tried in turn; a fallback is logged with its reason.
    Auto,
    /// These, in priority order; each must start. `ignored`: names of providers this build
    /// does not offer, skipped.
    Listed {
        providers: Vec<Provider>,
        ignored: Vec<String>,
    },
}

impl ProviderChoice {
    /// Parses `auto`, a comma list of short or ONNX Runtime names, or Roboflow's bracketed
    /// list (quotes allowed).
    pub fn parse(s: &str) -> Result<Self, String> {
        let inner = s.trim().trim_start_matches('[').trim_end_matches(']');
        let names: Vec<&str> = inner
            .split(',')
            .map(|n| n.trim().trim_matches(|c| c == '"' || c == '\'').trim())
            .filter(|n| !n.is_empty())
            .collect();
        if names.is_empty() || (names.len() == 1 && names[0].eq_ignore_ascii_case("auto")) {
            return Ok(ProviderChoice::Auto);
        }
        let mut providers = Vec::new();
        let mut ignored = Vec::new();
        for name in names {
            match Provider::parse(name) {
                Some(p) if !providers.contains(&p) => providers.push(p),
                Some(_) => {}
                None if FOREIGN.contains(&name.to_ascii_lowercase().as_str()) => {
                    ignored.push(name.to_string())
                }
                None => {
                    return Err(format!(
                        "unknown execution provider '{name}': use auto, tensorrt, cuda or cpu \
                         (or ONNX Runtime's names, e.g. CUDAExecutionProvider)"
                    ))
                }
            }
        }
        if providers.is_empty() {
            return Err(format!(
                "no usable execution provider in '{s}': this build offers tensorrt, cuda and cpu"
            ));
        }
        Ok(ProviderChoice::Listed { providers, ignored })
    }

    /// The providers to try, in order, and whether each must start (`false`: fall back).
    pub fn candidates(&self) -> (Vec<Provider>, bool) {
        match self {
            ProviderChoice::Auto => (
                vec![Provider::TensorRt, Provider::Cuda, Provider::Cpu],
                false,
            ),
            ProviderChoice::Listed { providers, .. } => {
                let mut v = providers.clone();
                if !v.contains(&Provider::Cpu) {
                    v.push(Provider::Cpu);
                }
                (v, true)
            }
        }
    }

    /// Whether the choice can only be a GPU (no CPU fallback was listed).
    pub fn wants_gpu(&self) -> bool {
        match self {
            ProviderChoice::Auto => false,
            ProviderChoice::Listed { providers, .. } => providers.iter().any(|p| p.is_gpu()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(p: &[Provider]) -> ProviderChoice {
        ProviderChoice::Listed {
            providers: p.to_vec(),
            ignored: vec![],
        }
    }

    #[test]
    fn short_names_and_ort_names_parse_in_order() {
        assert_eq!(ProviderChoice::parse("auto"), Ok(ProviderChoice::Auto));
        assert_eq!(ProviderChoice::parse(" "), Ok(ProviderChoice::Auto));
        assert_eq!(ProviderChoice::parse("cuda"), Ok(listed(&[Provider::Cuda])));
        assert_eq!(
            ProviderChoice::parse("TensorRT, cuda,CPU"),
            Ok(listed(&[Provider::TensorRt, Provider::Cuda, Provider::Cpu]))
        );
        assert_eq!(
            ProviderChoice::parse("trt,cuda,cuda"),
            Ok(listed(&[Provider::TensorRt, Provider::Cuda]))
        );
    }

    #[test]
    fn roboflows_bracketed_list_parses_and_skips_providers_this_build_lacks() {
        assert_eq!(
            ProviderChoice::parse(
                "[TensorrtExecutionProvider,CUDAExecutionProvider,CPUExecutionProvider]"
            ),
            Ok(listed(&[Provider::TensorRt, Provider::Cuda, Provider::Cpu]))
        );
        assert_eq!(
            ProviderChoice::parse(
                "['CUDAExecutionProvider', 'OpenVINOExecutionProvider', 'CPUExecutionProvider']"
            ),
            Ok(ProviderChoice::Listed {
                providers: vec![Provider::Cuda, Provider::Cpu],
                ignored: vec!["OpenVINOExecutionProvider".into()],
            })
        );
    }

    #[test]
    fn unknown_or_empty_lists_are_refused_with_the_choices() {
        let e = ProviderChoice::parse("cuda,gpu").unwrap_err();
        assert!(e.contains("unknown execution provider 'gpu'"), "{e}");
        let e = ProviderChoice::parse("[OpenVINOExecutionProvider]").unwrap_err();
        assert!(e.contains("no usable execution provider"), "{e}");
    }

    #[test]
    fn candidates_end_with_cpu_and_only_auto_falls_back() {
        assert_eq!(
            ProviderChoice::Auto.candidates(),
            (
                vec![Provider::TensorRt, Provider::Cuda, Provider::Cpu],
                false
            )
        );
        assert_eq!(
            listed(&[Provider::Cuda]).candidates(),
            (vec![Provider::Cuda, Provider::Cpu], true)
        );
        assert!(listed(&[Provider::Cuda]).wants_gpu());
        assert!(!listed(&[Provider::Cpu]).wants_gpu());
    }
}
