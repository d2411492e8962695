//! What the panels ask for; applied by [`super::StudioApp::apply`] once per frame.

use std::path::PathBuf;

use crate::protocol::JobId;

/// One user action.
#[derive(Debug, Clone, PartialEq)]
#[must_use]
pub enum UiCommand {
    /// Queue a job for the whole grid with the editor's parameters.
    Generate,
    /// Queue a job that regenerates one cell with its own seed.
    RegenerateCell(usize),
    /// Keep this cell's image in the first cell and fill the others with close variations
    /// of it (its seed in every cell, variation seeds seed + i).
    VaryAround(usize),
    /// Stop the running job.
    Stop,
    /// Save a cell's image (a live one) into the output folder and the history.
    Keep(usize),
    /// Put a cell's seed in the seed field and lock it.
    UseSeed(u64),
    /// Load this model (folder or hub id).
    LoadModel(String),
    /// Pick a model folder with the system dialog.
    BrowseModel,
    /// Pick a single-file checkpoint (.safetensors) with the system dialog.
    BrowseModelFile,
    /// Use this VAE instead of the model's own (`None`: Automatic) and reload the model.
    SetVae(Option<String>),
    /// Pick a VAE file with the system dialog.
    BrowseVae,
    /// Scan the models folder setting for checkpoints.
    ScanModels,
    /// Pick the models folder with the system dialog, then scan it.
    BrowseModelsDir,
    /// Put a model into the first free compare row and turn compare mode on.
    AddToCompare(String),
    /// Pick the model of a compare row with the system dialog (a folder when `folder`).
    BrowseCompareModel { row: usize, folder: bool },
    /// Pick the img2img init image with the system dialog.
    PickInitImage,
    /// Read an image file as the img2img init image.
    SetInitImage(PathBuf),
    /// Use a finished cell's image as the img2img init image.
    SendToImg2img(usize),
    /// Drop the init image and its mask (back to txt2img).
    ClearInit,
    /// Pick the ControlNet's picture with the system dialog.
    PickControlImage,
    /// Read an image file as the ControlNet's picture.
    SetControlImage(PathBuf),
    /// Drop the ControlNet's picture.
    ClearControlImage,
    /// Pick a ControlNet file with the system dialog.
    BrowseControlNet,
    /// List the models folder's ControlNets.
    ScanControlNets,
    /// Pick the output folder with the system dialog.
    BrowseOutput,
    /// Remove a queued job.
    CancelJob(JobId),
    /// Remove a queued job and put its parameters back in the editor.
    EditJob(JobId),
    /// Open (Some) or close (None) the large view of a cell.
    View(Option<usize>),
    /// Save a cell's image under a name the user picks.
    SaveAs(usize),
    /// Copy a cell's A1111 parameters to the clipboard.
    CopyParameters(usize),
    /// Restore the editor from a dropped PNG's parameters; an image without any becomes the
    /// init image.
    RestoreFromPng(PathBuf),
    /// Put a past generation's parameters (and first seed, locked) back in the editor.
    RestoreHistory(usize),
    /// Tick or untick a history entry for comparison (at most two).
    SelectHistory(usize),
    /// Put these fields of a past generation back in the editor.
    RestoreHistoryFields {
        entry: usize,
        fields: Vec<super::history::Field>,
    },
    /// List the LoRA folders' LoRAs.
    ScanLoras,
    /// Put `<lora:NAME:1>` into the prompt at its cursor.
    InsertLora(String),
    /// Replace the prompt's bytes `start..end` (a LoRA tag) with `text`.
    SetLoraWeight {
        start: usize,
        end: usize,
        text: String,
    },
    /// Hide a message.
    Dismiss(usize),
}
