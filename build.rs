//! Generates the CSI gRPC code from proto/csi.proto when the `csi` feature is on. protox
//! compiles the proto in Rust, so no protoc has to be installed; every other build does
//! nothing here.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "csi")]
    csi();
}

#[cfg(feature = "csi")]
fn csi() {
    println!("cargo:rerun-if-changed=proto/csi.proto");
    let descriptors = match protox::compile(["csi.proto"], ["proto"]) {
        Ok(d) => d,
        Err(e) => panic!("proto/csi.proto does not compile: {e}"),
    };
    if let Err(e) = tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .build_transport(false)
        .compile_fds(descriptors)
    {
        panic!("generating the CSI code failed: {e}");
    }
}
