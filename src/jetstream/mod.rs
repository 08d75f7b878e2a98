//! The sink stage: provisioning the stream (`provision`) and the ordered, pipelined,
//! gap-free publisher (`publisher`).

pub mod disruption;
pub mod params;
pub mod provision;
pub mod publisher;
