//! The async shell around the core: thin code that turns bytes and time into
//! inputs and effects into bytes. It never decides anything the core decides.

pub mod actor;
