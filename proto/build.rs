//! Generates the `bridge.v1` code from `bridge/v1/*.proto` with protox, so no
//! system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "bridge/v1/agent.proto",
        "bridge/v1/control.proto",
        "bridge/v1/jobs.proto",
        "bridge/v1/sweeps.proto",
        "bridge/v1/tunnels.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    tonic_prost_build::configure().bytes(".").compile_fds(fds)?;
    Ok(())
}
