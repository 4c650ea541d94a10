// liblzma (Debian: liblzma-dev), used to decompress a bzImage's xz payload on the host.
#include <lzma.h>
