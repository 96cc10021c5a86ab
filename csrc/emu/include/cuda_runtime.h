// Emulated CUDA header: everything lives in ../cuda_emu.h.
#pragma once
#include "../cuda_emu.h"
