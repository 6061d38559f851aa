//! The cutover coordinator: plans deployments and streams desired state to the agents
//! over mutual TLS. `cutover serve` runs [`serve::serve`]; the rest of the `cutover`
//! binary is the release manager's CLI in [`cli`]. This file only wires the modules;
//! ARCHITECTURE.md says what each owns.

pub mod admins;
pub mod analysis;
pub mod cli;
pub mod engine;
pub mod fleet;
pub mod grpc;
pub mod http;
pub mod inventory;
pub mod listener;
pub mod locks;
pub mod metrics;
pub mod model;
pub mod pki;
pub mod preview;
pub mod prometheus;
pub mod queries;
pub mod report;
pub mod rollout;
pub mod serve;
pub mod session;
pub mod store;
pub mod timeline;
pub mod tokens;
pub mod views;
pub mod webhooks;
