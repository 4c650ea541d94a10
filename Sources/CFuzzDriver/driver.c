// Only the declaration in CFuzzDriver.h matters; a C target needs one source file.
#include "CFuzzDriver.h"
