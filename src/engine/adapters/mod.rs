//! Adapters on a loaded model: LoRA files merged into its weights in place (`lora`, `patch`)
//! and textual-inversion embeddings in its prompts (`embedding`); `apply` resolves what a job asks for.
pub mod apply;
pub mod embedding;
pub mod lora;
pub mod patch;
