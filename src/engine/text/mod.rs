//! Prompts to token ids: the CLIP tokenizer and A1111's prompt syntax.
pub mod prompt;
pub mod tokenizer;
