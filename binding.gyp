# The disksnap native addon: C++17, node-addon-api with C++ exceptions disabled (errors are
# thrown as DisksnapError through napi, never as C++ exceptions).
#
# SHA-256 comes from the OpenSSL 3 that node itself exports; its headers are the ones under
# <nodedir>/include/node/openssl, which node-gyp puts on the include path ahead of any system
# OpenSSL. Do NOT add -lcrypto/-lssl: the symbols resolve against the node binary at load time.
{
  "targets": [
    {
      "target_name": "disksnap",
      "sources": [
        "native/addon.cc",
        "native/error.cc",
        "native/args.cc",
        "native/io.cc",
        "native/file.cc",
        "native/hash_engine.cc",
        "native/block_tag.cc",
        "native/ghash.cc",
        "native/hash.cc",
        "native/gcm.cc",
        "native/object.cc",
        "native/loop.cc",
        "native/fuse.cc",
        "native/qcow2.cc",
        "native/sorted.cc",
        "native/records.cc",
        "native/manifest.cc"
      ],
      "include_dirs": [
        "<!@(node -p \"require('node-addon-api').include\")"
      ],
      "defines": [
        "NAPI_VERSION=8",
        "NODE_ADDON_API_DISABLE_CPP_EXCEPTIONS",
        "_GNU_SOURCE",
        "_FILE_OFFSET_BITS=64",
        "DISKSNAP_VERSION=\"<!(node -p \"require('./package.json').version\")\""
      ],
      "cflags!": ["-fexceptions"],
      "cflags_cc!": ["-fexceptions", "-std=gnu++17"],
      "cflags": ["-O3", "-Wall", "-Wextra", "-Wno-unused-parameter"],
      "cflags_cc": ["-std=c++17", "-fno-exceptions", "-pthread"],
      "ldflags": ["-pthread"]
    }
  ]
}
