// OpenSSL's libcrypto (Debian: libssl-dev), for SHA-256 over guest memory at memory speed.
#include <openssl/evp.h>
