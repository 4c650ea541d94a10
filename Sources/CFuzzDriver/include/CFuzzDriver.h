// libFuzzer's entry for programs that have their own main (SwiftPM renames an executable's
// main, so tern-fuzz calls the driver instead of linking libFuzzer's main).
#include <stddef.h>
#include <stdint.h>

int LLVMFuzzerRunDriver(int *argc, char ***argv, int (*callback)(const uint8_t *data, size_t size));
