//! Prompts to token ids: the CLIP tokenizer and A1111's prompt syntax and extra-network tags.
pub mod extra_networks;
pub mod prompt;
pub mod tokenizer;
