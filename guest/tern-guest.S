/*
 * tern-guest.S: the built-in test guest of tern.
 *
 * A small bare-metal x86-64 program that dirties memory at a chosen rate and checks
 * that every byte it wrote is still there, so that tern's live migration (and
 * anything else that moves or snapshots guest memory) can be tested without a
 * Linux guest.  Optionally it does the same to a virtio-blk disk.  It prints what
 * it does on COM1.  See guest/README.md.
 *
 * Assembled with GNU as into a flat binary (guest/build.sh); the first byte of
 * the file is loaded at guest-physical 0x100000.
 *
 * ENTRY PATHS
 *
 *   multiboot (QEMU -kernel): QEMU reads the multiboot v1 header at offset 0
 *     (a.out kludge, since the file is not ELF), loads the file at 0x100000 and
 *     jumps to entry32 in 32-bit protected mode, paging off, with
 *     EAX = 0x2BADB002 and EBX = the multiboot information.  entry32 builds an
 *     identity map of 0-4 GiB at 0x1D0000, enters long mode and joins common64
 *     as CPU 0 of 1.
 *
 *   tern (KVM): every vCPU starts at the same moment at entry64 (address in
 *     the image header at offset 0x28), already in long mode at CPL 0 with an
 *     identity map of 0-4 GiB (U/S set) and IF = 0, and with
 *       RSI = guest-physical address of a Linux boot_params ("zero page"),
 *       RDI = this vCPU's index (0 = boot CPU), RDX = number of vCPUs.
 *
 *   Both paths do the least possible at CPL 0 (on this host's paravirtual KVM
 *   every memory store at CPL 0 traps to the hypervisor): load our GDT and the
 *   data segments, pick the per-CPU stack, push an IRETQ frame and drop to
 *   CPL 3 with IOPL 3 and IF = 0.  Everything else (command line, TSC
 *   calibration, workload, printing) runs at CPL 3 at native speed and uses the
 *   UART and PIT ports directly thanks to IOPL 3.  No interrupt is ever taken,
 *   so there is no IDT and no TSS.
 *
 * IMAGE HEADER (offsets in the file)
 *   0x00  multiboot v1 header: magic, flags (bit 1 memory info, bit 16 a.out
 *         kludge), checksum, header_addr, load_addr, load_end_addr,
 *         bss_end_addr, entry_addr (= entry32)
 *   0x20  "TERNGST1"
 *   0x28  u64 guest-physical address of entry64
 *   0x30  u64 image format version = 1
 *
 * MEMORY MAP (guest-physical, fixed)
 *   0x00100000  this image
 *   0x00180000  per-CPU stacks, 16 KiB each, 16 CPUs at most (vCPUs beyond the
 *               16th halt at CPL 0 and take no part)
 *   0x001C0000  control block (see CB_* below)
 *   0x001D0000  page tables, multiboot path only (PML4, PDPT, 4 page directories)
 *   0x00200000  generation table: u32 per working-set page; at most
 *               (3 GiB - 16 MiB) / 4 KiB = 782336 pages, so it ends by 0x4FC000
 *   0x00700000  the disk: virtqueue, request header and status byte (0x700000-
 *               0x701000), data buffer of up to 64 KiB (0x710000), one block as it
 *               should be (0x720000)
 *   0x00800000  block generation table: u32 per disk block (up to 0x1000000, so
 *               2M blocks, 8 GiB of disk working set)
 *   0x01000000  the working set, wss bytes, ending below both the end of RAM
 *               and 3 GiB (wss is clamped, with a message, when it does not fit)
 *   RAM at the fixed addresses must start out zero (fresh RAM is; tern's loader
 *   also clears the control block on every load, so that a reset restarts cleanly).
 *
 * COMMAND LINE (space-separated tokens; unknown tokens are ignored, so the
 * kernel file name QEMU puts first does no harm)
 *   wss=SIZE        working-set size, default 64M
 *   rate=SIZE       bytes per second dirtied, over all CPUs; 0 = idle (default)
 *   pattern=random  page bodies are pseudo-random, incompressible (default)
 *   pattern=zero    page bodies are zero
 *   pattern=compressible
 *                   page bodies mix pseudo-random words and a filler, so a
 *                   page compresses about R:1 with zlib level 1 (see ratio=)
 *   ratio=R         pattern=compressible's ratio, 1..16 (default 3)
 *   lines=N         a rewrite changes only the page's first N 64-byte lines,
 *                   1..64 (default 64, the whole page); the others keep what
 *                   the first fill wrote.  A rewritten page still counts as
 *                   4096 bytes towards rate=
 *   disk=SIZE       disk working set, from sector 0 (default 0: no disk workload,
 *                   no device touched); clamped to the capacity and 8 GiB
 *   disk-rate=SIZE  disk bytes rewritten per second (default 0: the first fill only)
 *   disk-io=SIZE    bytes per request, 4K..64K in whole 4K (default 4K)
 *   virtio_mmio.device=SIZE@0xBASE:IRQ[:ID]
 *                   Linux's token for a virtio-mmio device (tern appends it); the
 *                   disk is the first whose registers say virtio-blk, version 2
 *   reboot=N        after N pass lines, print "tern-guest: reboot" and pulse
 *                   the reset line through the keyboard controller (port
 *                   0x64, command 0xFE), as Linux's reboot=k does; tern then
 *                   exits with status 0 (QEMU resets, or exits with -no-reboot)
 *   SIZE is a decimal number with an optional suffix K, M or G (powers of 1024).
 *   ratio= and lines= take a plain number; values out of range are ignored.
 *
 * PAGE FORMAT
 *   The working set is numbered in 4 KiB pages from 0; page p lives at
 *   0x1000000 + p * 4096 and has a generation g (u32, 1 after the first fill,
 *   +1 on every rewrite, kept in the generation table).  Its 512 u64 words:
 *     word 0       header = g << 32 | p
 *     random:      word i (1..511) = lane i%4, output number i/4 + 1, where lane j
 *                  is an xorshift64 (13, 7, 17) generator seeded with
 *                  splitmix64_mix(header + (j + 1) * 0x9E3779B97F4A7C15) | 1
 *                  (lane 0's first output is the word the header replaces)
 *     zero:        words 1..511 are 0
 *     compressible: with n = ratio_words[R - 1] random words per page, word i
 *                  (1..511) is random when ((i - 1) * n + 511) mod 512 + n >= 512
 *                  (exactly n of them, spread evenly), and then equals
 *                  splitmix64_mix(header + i * 0x9E3779B97F4A7C15) | 1; every
 *                  other word is the filler 0x0101010101010101 * ((p mod 128) + 1)
 *   Four independent lanes let the CPU overlap the serial xorshift chains.
 *   A disk block b (4 KiB, sectors 8b..8b+7) with generation g holds
 *   pattern=random's page for the header g << 32 | b, whatever pattern= says,
 *   with word 1 replaced by "TERNDISK" (0x4B5349444E524554).
 *   The page is 64 lines of 8 words (line 0 holds the header).  With lines=N
 *   below 64, lines 0..N-1 hold generation g's contents and lines N..63
 *   generation 1's (as written by the first fill), whatever g is.
 *
 * WORKLOAD
 *   The pages are split evenly between the CPUs (the last takes the
 *   remainder); each CPU only ever touches its own pages and their table
 *   entries, so no locking is needed.  Each CPU fills its pages with
 *   generation 1, waits for all the others, then loops:
 *     - dirtying: pages due = rate_cpu * elapsed / 4096; every missing page is
 *       written round-robin: verify its lines 0..N-1 against its current
 *       generation, then write them with generation + 1 and update the table
 *       (lines N..63 are left to the sweep).  A backlog above a quarter
 *       of a second (e.g. after the VM was paused) is forgotten, not caught up.
 *     - verification sweep: the same pacing at 256 MiB/s per CPU, reading
 *       pages round-robin; a completed round over the CPU's pages is a sweep.
 *     - CPU 0, once a second, prints the pass line.
 *   A page that does not match is reported, counted, and written again with
 *   the contents it should have had, so each corruption is reported once.
 *   With disk=, CPU 0 also fills the disk (generation 1) before the barrier,
 *   and in its loop rewrites disk-io runs of blocks round-robin at disk-rate
 *   (generation + 1, not read first) and reads runs back round-robin at
 *   max(disk-rate, 16 MiB/s), checking every word; a bad block is reported,
 *   counted and written again, like a page.
 *
 * LINES PRINTED ON COM1 (each ends with "\n" alone)
 *   tern-guest: start cpus C wss W MiB rate R MiB/s pattern P lines L tsc T MHz
 *   tern-guest: pass N rate RMiB/s ok sweeps S [disk DMiB/s dsweeps Q] gap G us
 *   tern-guest: pass N rate RMiB/s FAIL sweeps S [disk DMiB/s dsweeps Q] corrupt K [clock-backwards B] gap G us
 *   tern-guest: CORRUPT page N
 *   tern-guest: CORRUPT block N
 *   tern-guest: DISK-ERROR status S sector X
 *   tern-guest: DISK-ERROR device-status S sector X
 *   tern-guest: disk virtio-blk at 0xBASE capacity C MiB wss W MiB rate R MiB/s io I KiB
 *   tern-guest: disk filled W MiB
 *   tern-guest: disk clamped to W MiB (capacity C MiB, at most 8192 MiB)
 *   tern-guest: disk not usable: REASON
 *   tern-guest: wss clamped to W MiB (working set must end below L MiB)
 *   tern-guest: PIT calibration timed out, assuming tsc T MHz
 *   P is "random", "zero" or "compressible ratio R"; L is lines=.
 *   N counts pass lines from 1; R is MiB/s actually dirtied in the last second
 *   by all CPUs; S is the number of complete verification sweeps of the whole
 *   working set (the smallest count over the CPUs); K is the number of corrupt
 *   pages found so far.  Only the first 64 CORRUPT lines are printed; K keeps
 *   counting.  G is the largest step of the TSC between two rounds of the main
 *   loop on any CPU since the previous line, in microseconds (a round normally
 *   takes well under a millisecond; a stop of the VM shows as a gap as long as
 *   the stop, a migration whose TSC is carried over frozen shows none).  B counts
 *   the times a CPU read a TSC lower than its previous reading: any makes the
 *   line FAIL.  The disk part is there only with a disk workload: D is MiB/s
 *   of blocks rewritten in the last second, Q complete verification sweeps of
 *   the disk.  K then counts pages, blocks and disk errors together, and they
 *   share the 64 lines.
 */

/* ---------------------------------------------------------------------------
 * Constants
 */
        .equ IMAGE_BASE,        0x100000
        .equ STACKS,            0x180000
        .equ STACK_SIZE,        0x4000
        .equ MAX_CPUS,          16
        .equ CB,                0x1C0000        /* control block */
        .equ PT_BASE,           0x1D0000        /* multiboot path page tables */
        .equ GEN_TABLE,         0x200000
        .equ WS_BASE,           0x1000000
        .equ WS_LIMIT,          0xC0000000      /* working set ends below 3 GiB */
        .equ DEFAULT_WSS,       64 << 20

        .equ MB_MAGIC,          0x1BADB002
        .equ MB_FLAGS,          0x00010002      /* memory info, a.out kludge */
        .equ MB_BOOT_MAGIC,     0x2BADB002

        /* GDT selectors (see gdt below) */
        .equ KERNEL_CS,         0x08
        .equ USER_CS,           0x18 | 3
        .equ USER_DS,           0x20 | 3
        .equ RFLAGS_USER,       0x3002          /* IOPL 3, IF 0, reserved bit 1 */

        /* How the 64-bit code was entered (R8 on the way to user_main). */
        .equ BOOT_ZEROPAGE,     0               /* RSI = Linux boot_params */
        .equ BOOT_MULTIBOOT,    1               /* RSI = multiboot information */

        /* boot_params offsets (Linux Documentation/arch/x86/zero-page.rst) */
        .equ BP_E820_COUNT,     0x1e8           /* u8 */
        .equ BP_CMD_LINE_PTR,   0x228           /* u32, hdr.cmd_line_ptr */
        .equ BP_E820_TABLE,     0x2d0           /* 20-byte entries */
        .equ BP_E820_MAX,       128

        .equ PATTERN_RANDOM,    0
        .equ PATTERN_ZERO,      1
        .equ PATTERN_COMPRESSIBLE, 2
        .equ LINES_PER_PAGE,    64              /* 64-byte cache lines in a page */
        .equ DEFAULT_RATIO,     3
        .equ MAX_RATIO,         16

        /* Control block layout. */
        .equ CB_LOCK,           0x00            /* u32 UART spinlock */
        .equ CB_READY,          0x08            /* set by CPU 0 once the config is published */
        .equ CB_TSC_HZ,         0x10
        .equ CB_WSS,            0x18            /* requested wss in bytes (parsing) */
        .equ CB_WSS_PAGES,      0x20            /* working-set pages in use */
        .equ CB_RATE,           0x28            /* bytes per second, all CPUs */
        .equ CB_PATTERN,        0x30
        .equ CB_NCPUS,          0x38
        .equ CB_FILLED,         0x40            /* CPUs done with the first fill */
        .equ CB_CORRUPT,        0x48            /* corrupt pages found */
        .equ CB_REBOOT,         0x50            /* reset after this many pass lines; 0 = never */
        .equ CB_LINES,          0x58            /* lines rewritten per page, 1..64 */
        .equ CB_RATIO,          0x60            /* pattern=compressible: ratio=R, 1..16 */
        .equ CB_NRAND,          0x68            /* pattern=compressible: random words per page */
        .equ CB_CLOCKBACK,      0x70            /* times a CPU's TSC went backwards */
        .equ CB_DISK,           0x78            /* disk=: requested disk working set, bytes */
        .equ CB_DISK_RATE,      0x80            /* disk-rate=: bytes rewritten per second */
        .equ CB_DISK_IO,        0x88            /* disk-io=: request size, bytes */
        .equ CB_DISK_REGS,      0x90            /* the virtio-blk device's registers */
        .equ CB_DISK_BLOCKS,    0x98            /* disk working-set blocks; 0 = no disk workload */
        .equ CB_DISK_CAP,       0xA0            /* device capacity, 512-byte sectors */
        .equ CB_DISK_AVAIL,     0xA8            /* requests made available so far (avail->idx) */
        .equ CB_DISK_QSIZE,     0xB0            /* queue size in use */
        .equ CB_DISK_DEAD,      0xB8            /* the device asked for a reset: no more requests */
        .equ CB_NMMIO,          0xC0            /* virtio_mmio.device= tokens kept */
        .equ CB_MMIO,           0x600           /* their register addresses, MAX_MMIO u64s */
        .equ MAX_MMIO,          16
        .equ CB_PERCPU,         0x100           /* one cache line per CPU: */
        .equ PC_WRITTEN,        0x00            /*   pages rewritten (paced) */
        .equ PC_SWEEPS,         0x08            /*   complete verification sweeps */
        .equ PC_MAXGAP,         0x10            /*   largest TSC step between two rounds since the last pass line */
        .equ PC_SIZE,           64

        /* PIT channel 2 at 1193182 Hz; 59659 ticks = 50 ms. */
        .equ PIT_HZ,            1193182
        .equ PIT_COUNT,         59659

        /* The disk (virtio-blk over virtio-mmio, CPU 0 only).  The queue and buffers
         * lie in 0x700000-0x800000, the block generation table above them. */
        .equ VQ_DESC,           0x700000        /* descriptor table, 16 bytes each */
        .equ VQ_AVAIL,          0x700400        /* available ring: flags, idx, ring[], used_event */
        .equ VQ_USED,           0x700800        /* used ring: flags, idx, ring[] {id, len}, avail_event */
        .equ REQ_HDR,           0x700C00        /* request header: u32 type, u32 0, u64 sector */
        .equ REQ_STATUS,        0x700C10        /* status byte, written by the device */
        .equ DISK_BUF,          0x710000        /* data of one request, up to 64 KiB */
        .equ DISK_EXPECT,       0x720000        /* one block as it should be: checks and repairs */
        .equ BLOCK_TABLE,       0x800000        /* u32 generation per disk block, to WS_BASE */
        .equ MAX_DISK_BLOCKS,   (WS_BASE - BLOCK_TABLE) / 4     /* 2M blocks, 8 GiB */
        .equ DISK_TAG,          0x4B5349444E524554              /* "TERNDISK", word 1 of a block */
        .equ MAX_QUEUE,         16              /* queue size used, if the device allows it */
        .equ MIN_QUEUE,         4               /* a request is a chain of 3 descriptors */
        .equ DISK_VERIFY_MIN,   16 << 20        /* disk sweep rate when disk-rate= is lower */
        .equ DISK_CHUNK,        4               /* most requests of each kind per round */
        .equ DISK_IO_MAX,       64 << 10
        .equ DEFAULT_DISK_IO,   4 << 10

        /* virtio-mmio registers (virtio 1.x, 4.2.2), all accessed as u32 */
        .equ VIRTIO_MAGIC,      0x74726976      /* "virt" */
        .equ VM_MAGIC,          0x000
        .equ VM_VERSION,        0x004
        .equ VM_DEVICE_ID,      0x008
        .equ VM_DEV_FEATURES,   0x010
        .equ VM_DEV_FEATURES_SEL, 0x014
        .equ VM_DRV_FEATURES,   0x020
        .equ VM_DRV_FEATURES_SEL, 0x024
        .equ VM_QUEUE_SEL,      0x030
        .equ VM_QUEUE_NUM_MAX,  0x034
        .equ VM_QUEUE_NUM,      0x038
        .equ VM_QUEUE_READY,    0x044
        .equ VM_QUEUE_NOTIFY,   0x050
        .equ VM_INT_STATUS,     0x060
        .equ VM_INT_ACK,        0x064
        .equ VM_STATUS,         0x070
        .equ VM_QUEUE_DESC,     0x080           /* low, high at +4 */
        .equ VM_QUEUE_DRIVER,   0x090
        .equ VM_QUEUE_DEVICE,   0x0a0
        .equ VM_CONFIG_GEN,     0x0fc
        .equ VM_CONFIG,         0x100           /* virtio-blk: u64 capacity in sectors */
        .equ VIRTIO_ID_BLOCK,   2
        .equ ST_ACKNOWLEDGE,    1
        .equ ST_DRIVER,         2
        .equ ST_DRIVER_OK,      4
        .equ ST_FEATURES_OK,    8
        .equ ST_NEEDS_RESET,    0x40
        .equ ST_FAILED,         0x80
        .equ VIRTIO_BLK_T_IN,   0
        .equ VIRTIO_BLK_T_OUT,  1
        .equ VRING_DESC_F_NEXT, 1
        .equ VRING_DESC_F_WRITE, 2

        .equ VERIFY_RATE,       256 << 20       /* bytes per second per CPU */
        .equ CHUNK,             32              /* most pages per step before looking at the clock */
        .equ MAX_CORRUPT_LINES, 64
        .equ LINE_BUF,          160

        /* Per-CPU worker frame, addressed from %rbp (at CPL 3, on the CPU's stack). */
        .equ F_LO,              0x00            /* first page of this CPU's share */
        .equ F_N,               0x08            /* pages in the share */
        .equ F_RATE,            0x10            /* this CPU's bytes per second */
        .equ F_DENOM,           0x18            /* tsc_hz * 4096 */
        .equ F_T0,              0x20            /* TSC when pacing started */
        .equ F_CAPW,            0x28            /* largest dirtying backlog kept, pages */
        .equ F_CREDW,           0x30            /* pages dirtied (or forgiven) so far */
        .equ F_CURW,            0x38            /* next page to dirty, within the share */
        .equ F_CAPV,            0x40
        .equ F_CREDV,           0x48
        .equ F_CURV,            0x50            /* next page to verify, within the share */
        .equ F_PC,              0x58            /* address of this CPU's control-block line */
        .equ F_NEXT,            0x60            /* CPU 0: TSC of the next pass line */
        .equ F_LASTT,           0x68            /* CPU 0: TSC of the previous pass line */
        .equ F_LASTW,           0x70            /* CPU 0: pages written at the previous line */
        .equ F_PASS,            0x78            /* CPU 0: pass lines printed */
        .equ F_PREVT,           0x80            /* TSC at the previous round of the main loop */
        /* CPU 0, the disk (in 4 KiB blocks; paced like the pages): */
        .equ F_DCAPW,           0x88            /*   largest rewrite backlog kept */
        .equ F_DCREDW,          0x90            /*   blocks rewritten (or forgiven) so far */
        .equ F_DCURW,           0x98            /*   next block to rewrite */
        .equ F_DVRATE,          0xA0            /*   sweep rate, bytes per second */
        .equ F_DCAPV,           0xA8
        .equ F_DCREDV,          0xB0
        .equ F_DCURV,           0xB8            /*   next block to verify */
        .equ F_DWRITTEN,        0xC0            /*   blocks rewritten (paced) */
        .equ F_DLASTW,          0xC8            /*   ... at the previous pass line */
        .equ F_DSWEEPS,         0xD0            /*   complete verification sweeps */
        .equ F_DRATE,           0xD8            /*   MiB/s rewritten, for the pass line */
        .equ FRAME_SIZE,        0xE0

        .text
        .globl _start

/* ---------------------------------------------------------------------------
 * Image header.  tern's loader and QEMU's multiboot loader both read it.
 */
_start:
mb_header:
        .long MB_MAGIC
        .long MB_FLAGS
        .long -(MB_MAGIC + MB_FLAGS)
        .long mb_header                 /* header_addr */
        .long _start                    /* load_addr: the file starts here */
        .long image_end                 /* load_end_addr */
        .long image_end                 /* bss_end_addr: no bss */
        .long entry32                   /* entry_addr */

        .org 0x20                       /* .org cannot go backwards: checks the layout */
        .ascii "TERNGST1"
        .quad entry64                   /* 0x28 */
        .quad 1                         /* 0x30 image format version */
        .org 0x38

/* ---------------------------------------------------------------------------
 * Multiboot entry: 32-bit protected mode, paging off.  Memory stores are cheap
 * here (this path only runs under QEMU), so build the page tables in place.
 */
        .code32
entry32:
        cli
        cld
        cmp $MB_BOOT_MAGIC, %eax
        jne hang32
        mov %ebx, %esi                  /* keep the multiboot information pointer */

        /* Zero PML4, PDPT and four page directories. */
        mov $PT_BASE, %edi
        mov $(6 * 4096 / 4), %ecx
        xor %eax, %eax
        rep stosl

        /* Every level P | R/W | U/S: the workload runs at CPL 3. */
        movl $(PT_BASE + 0x1000 + 7), PT_BASE   /* PML4[0] -> PDPT */
        mov $(PT_BASE + 0x1000), %edi
        mov $(PT_BASE + 0x2000 + 7), %eax
        mov $4, %ecx
1:      mov %eax, (%edi)                        /* PDPT[i] -> page directory i */
        add $0x1000, %eax
        add $8, %edi
        loop 1b

        /* 2048 2 MiB pages (P | R/W | U/S | PS), the four directories back to back. */
        mov $(PT_BASE + 0x2000), %edi
        mov $0x87, %eax
        mov $2048, %ecx
2:      mov %eax, (%edi)
        add $0x200000, %eax
        add $8, %edi
        loop 2b

        mov %cr4, %eax
        or $0x20, %eax                  /* PAE */
        mov %eax, %cr4
        mov $PT_BASE, %eax
        mov %eax, %cr3
        mov $0xC0000080, %ecx           /* EFER */
        rdmsr
        or $0x100, %eax                 /* LME */
        wrmsr
        lgdt gdt_desc
        mov %cr0, %eax
        or $0x80000001, %eax            /* PG | PE: long mode becomes active */
        mov %eax, %cr0
        ljmp $KERNEL_CS, $from32

hang32:
        hlt
        jmp hang32

        .code64
from32:
        mov %esi, %esi                  /* RSI = multiboot information (zero-extended) */
        xor %edi, %edi                  /* CPU 0 */
        mov $1, %edx                    /* of 1 */
        mov $BOOT_MULTIBOOT, %r8d
        jmp common64

/* ---------------------------------------------------------------------------
 * tern entry: long mode, CPL 0, IF = 0, RSI = boot_params, RDI = vCPU index,
 * RDX = vCPU count.  From here to the IRETQ, the only memory stores are the
 * five pushes of the IRETQ frame.
 */
entry64:
        mov $BOOT_ZEROPAGE, %r8d
common64:
        /* Our own GDT: tern's selectors are not ours to rely on.  Descriptors
         * have the accessed bit preset, so loading them writes nothing. */
        lgdt gdt_desc(%rip)
        mov $USER_DS, %eax              /* DPL 3 data may be loaded at CPL 0 */
        mov %eax, %ds
        mov %eax, %es
        mov %eax, %fs
        mov %eax, %gs

        cmp $MAX_CPUS, %rdi
        jae park                        /* no stack for it: sit out */
        mov %rdi, %rax
        shl $14, %rax                   /* * STACK_SIZE */
        lea STACKS + STACK_SIZE(%rax), %rsp
        mov %rsp, %rax

        /* CPL 3, IOPL 3 (in/out allowed), IF 0; RSI, RDI, RDX, R8 pass through. */
        pushq $USER_DS                  /* SS */
        push %rax                       /* RSP: the same stack */
        pushq $RFLAGS_USER
        pushq $USER_CS
        pushq $user_main
        iretq

park:
        hlt
        jmp park

        .balign 16
gdt:
        .quad 0                         /* 0x00 null */
        .quad 0x00AF9B000000FFFF        /* 0x08 code, 64-bit, DPL 0, accessed */
        .quad 0x00CF93000000FFFF        /* 0x10 data, DPL 0, accessed */
        .quad 0x00AFFB000000FFFF        /* 0x18 code, 64-bit, DPL 3, accessed */
        .quad 0x00CFF3000000FFFF        /* 0x20 data, DPL 3, accessed */
gdt_end:
        .balign 8
        .word 0
gdt_desc:                               /* limit, then base: 32-bit lgdt reads the low half */
        .word gdt_end - gdt - 1
        .quad gdt

/* ===========================================================================
 * Everything below runs at CPL 3.
 *
 * Calling convention of the helpers: arguments in RDI, RSI, RDX; result in
 * RAX; RAX, RCX, RDX, RSI, RDI and R8-R11 may be clobbered; RBX, RBP and
 * R12-R15 are preserved.
 */

user_main:
        cld
        mov %rdi, %r12                  /* CPU index, for good */
        test %r12, %r12
        jnz 1f
        call setup                      /* CPU 0 reads the configuration */
        movq $1, CB + CB_READY          /* x86 stores are ordered: the config is visible first */
        jmp worker
1:      pause                           /* the other CPUs wait for it */
        cmpq $0, CB + CB_READY
        je 1b
        jmp worker

/*
 * setup (CPU 0): RSI = boot information, RDX = CPU count, R8 = BOOT_*.
 * Fills the control block and prints the start line.
 */
setup:
        push %rbx
        push %r13
        push %r14

        test %rdx, %rdx                 /* a count of 0 means "just me" */
        jnz 1f
        mov $1, %edx
1:      cmp $MAX_CPUS, %rdx
        jbe 2f
        mov $MAX_CPUS, %edx
2:      mov %rdx, CB + CB_NCPUS

        movq $DEFAULT_WSS, CB + CB_WSS
        movq $0, CB + CB_RATE
        movq $PATTERN_RANDOM, CB + CB_PATTERN
        movq $LINES_PER_PAGE, CB + CB_LINES
        movq $DEFAULT_RATIO, CB + CB_RATIO
        movq $0, CB + CB_FILLED
        movq $0, CB + CB_CORRUPT
        movq $0, CB + CB_DISK
        movq $0, CB + CB_DISK_RATE
        movq $DEFAULT_DISK_IO, CB + CB_DISK_IO
        movq $0, CB + CB_DISK_BLOCKS
        movq $0, CB + CB_DISK_AVAIL
        movq $0, CB + CB_DISK_DEAD
        movq $0, CB + CB_NMMIO
        movl $0, CB + CB_LOCK
        mov $(CB + CB_PERCPU), %edi     /* zero every CPU's counters */
        mov $(MAX_CPUS * PC_SIZE / 8), %ecx
        xor %eax, %eax
        rep stosq

        /* Find the command line (RBX) and where RAM containing WS_BASE ends (R13, 0 if unknown). */
        xor %ebx, %ebx
        xor %r13d, %r13d
        test %rsi, %rsi
        jz .Linfo_done
        cmp $BOOT_MULTIBOOT, %r8
        je .Lmultiboot

        mov BP_CMD_LINE_PTR(%rsi), %ebx
        movzbl BP_E820_COUNT(%rsi), %ecx
        lea BP_E820_TABLE(%rsi), %rdx
        cmp $BP_E820_MAX, %ecx
        jbe 3f
        mov $BP_E820_MAX, %ecx
3:      test %ecx, %ecx
        jz .Linfo_done
        cmpl $1, 16(%rdx)               /* type 1: RAM */
        jne 4f
        mov (%rdx), %rax
        cmp $WS_BASE, %rax
        ja 4f
        add 8(%rdx), %rax               /* end of an entry that starts at or below WS_BASE */
        cmp $WS_BASE, %rax
        jbe 4f
        mov %rax, %r13
4:      add $20, %rdx
        dec %ecx
        jmp 3b

.Lmultiboot:
        mov (%rsi), %eax                /* flags */
        test $1, %al                    /* mem_upper: KiB of RAM from 1 MiB on */
        jz 5f
        mov 8(%rsi), %r13d
        add $1024, %r13
        shl $10, %r13
5:      test $4, %al                    /* cmdline */
        jz .Linfo_done
        mov 16(%rsi), %ebx

.Linfo_done:
        mov %rbx, %rsi
        call parse_cmdline
        mov CB + CB_RATIO, %rax         /* ratio=R: random words per page, from the table */
        movzwl ratio_words - 2(, %rax, 2), %eax
        mov %rax, CB + CB_NRAND
        call calibrate_tsc
        mov %rax, CB + CB_TSC_HZ

        /* Rates above 1 TiB/s make no sense and would overflow the pacing arithmetic. */
        mov $1, %eax
        shl $40, %rax
        cmp %rax, CB + CB_DISK_RATE
        jbe 15f
        mov %rax, CB + CB_DISK_RATE
15:     cmp %rax, CB + CB_RATE
        jbe 6f
        mov %rax, CB + CB_RATE

        /* Working-set pages: end below RAM's end and 3 GiB. */
6:      xor %r14d, %r14d                /* 1 if clamped */
        mov CB + CB_WSS, %rax
        shr $12, %rax
        mov $WS_LIMIT, %ecx
        test %r13, %r13
        jz 7f
        cmp %rcx, %r13
        jae 7f
        mov %r13, %rcx
7:      mov %rcx, %rbx                  /* the limit, for the message */
        sub $WS_BASE, %rcx
        jae 8f
        xor %ecx, %ecx
8:      shr $12, %rcx                   /* most pages that fit */
        cmp %rcx, %rax
        jbe 9f
        mov %rcx, %rax
        mov $1, %r14d
9:      cmp CB + CB_NCPUS, %rax         /* at least a page per CPU */
        jae 10f
        mov CB + CB_NCPUS, %rax
10:     mov %rax, CB + CB_WSS_PAGES

        sub $LINE_BUF, %rsp
        test %r14, %r14
        jz 11f
        mov %rsp, %rdi
        lea msg_clamped(%rip), %rsi
        call put_str
        mov CB + CB_WSS_PAGES, %rax
        shr $8, %rax                    /* pages to MiB */
        call put_dec
        lea msg_clamped2(%rip), %rsi
        call put_str
        mov %rbx, %rax
        shr $20, %rax
        call put_dec
        lea msg_clamped3(%rip), %rsi
        call put_str
        mov %rsp, %rsi
        call send_line

11:     mov %rsp, %rdi
        lea msg_start(%rip), %rsi
        call put_str
        mov CB + CB_NCPUS, %rax
        call put_dec
        lea msg_start_wss(%rip), %rsi
        call put_str
        mov CB + CB_WSS_PAGES, %rax
        shr $8, %rax
        call put_dec
        lea msg_start_rate(%rip), %rsi
        call put_str
        mov CB + CB_RATE, %rax
        shr $20, %rax
        call put_dec
        lea msg_start_pattern(%rip), %rsi
        call put_str
        lea str_random(%rip), %rsi
        cmpq $PATTERN_ZERO, CB + CB_PATTERN
        jne 12f
        lea str_zero(%rip), %rsi
12:     cmpq $PATTERN_COMPRESSIBLE, CB + CB_PATTERN
        jne 13f
        lea str_compressible(%rip), %rsi
        call put_str
        lea msg_start_ratio(%rip), %rsi
        call put_str
        mov CB + CB_RATIO, %rax
        call put_dec
        jmp 14f
13:     call put_str
14:     lea msg_start_lines(%rip), %rsi
        call put_str
        mov CB + CB_LINES, %rax
        call put_dec
        lea msg_start_tsc(%rip), %rsi
        call put_str
        mov CB + CB_TSC_HZ, %rax
        add $500000, %rax               /* MHz, rounded */
        xor %edx, %edx
        mov $1000000, %ecx
        div %rcx
        call put_dec
        lea msg_start_mhz(%rip), %rsi
        call put_str
        mov %rsp, %rsi
        call send_line
        add $LINE_BUF, %rsp

        call disk_setup

        pop %r14
        pop %r13
        pop %rbx
        ret

/*
 * parse_cmdline: RSI = NUL-terminated command line, or 0.  Tokens are
 * separated by spaces (any byte <= ' '); known ones set CB_WSS, CB_RATE,
 * CB_REBOOT, CB_LINES, CB_RATIO, CB_PATTERN; anything else is skipped.
 */
parse_cmdline:
        push %rbx
        test %rsi, %rsi
        jz .Lp_done
.Lp_skip:
        movzbl (%rsi), %eax
        test %eax, %eax
        jz .Lp_done
        cmp $' ', %eax
        ja .Lp_token
        inc %rsi
        jmp .Lp_skip

.Lp_token:
        mov %rsi, %rbx                  /* token start */
        lea str_wss(%rip), %rdi
        call starts_with
        test %rax, %rax
        jz 1f
        mov %rax, %rsi
        call parse_size
        test %edx, %edx
        jz .Lp_next
        mov %rax, CB + CB_WSS
        jmp .Lp_next

1:      lea str_rate(%rip), %rdi
        call starts_with
        test %rax, %rax
        jz 2f
        mov %rax, %rsi
        call parse_size
        test %edx, %edx
        jz .Lp_next
        mov %rax, CB + CB_RATE
        jmp .Lp_next

2:      lea str_reboot(%rip), %rdi
        call starts_with
        test %rax, %rax
        jz 5f
        mov %rax, %rsi
        call parse_size
        test %edx, %edx
        jz .Lp_next
        mov %rax, CB + CB_REBOOT
        jmp .Lp_next

5:      lea str_lines(%rip), %rdi
        call starts_with
        test %rax, %rax
        jz 6f
        mov %rax, %rsi
        call parse_size
        test %edx, %edx
        jz .Lp_next
        lea -1(%rax), %rcx              /* 1..64, else ignored */
        cmp $(LINES_PER_PAGE - 1), %rcx
        ja .Lp_next
        mov %rax, CB + CB_LINES
        jmp .Lp_next

6:      lea str_ratio(%rip), %rdi
        call starts_with
        test %rax, %rax
        jz 7f
        mov %rax, %rsi
        call parse_size
        test %edx, %edx
        jz .Lp_next
        lea -1(%rax), %rcx              /* 1..16, else ignored */
        cmp $(MAX_RATIO - 1), %rcx
        ja .Lp_next
        mov %rax, CB + CB_RATIO
        jmp .Lp_next

7:      lea str_disk(%rip), %rdi
        call starts_with
        test %rax, %rax
        jz 9f
        mov %rax, %rsi
        call parse_size
        test %edx, %edx
        jz .Lp_next
        mov %rax, CB + CB_DISK
        jmp .Lp_next

9:      lea str_disk_rate(%rip), %rdi
        call starts_with
        test %rax, %rax
        jz 10f
        mov %rax, %rsi
        call parse_size
        test %edx, %edx
        jz .Lp_next
        mov %rax, CB + CB_DISK_RATE
        jmp .Lp_next

10:     lea str_disk_io(%rip), %rdi
        call starts_with
        test %rax, %rax
        jz 11f
        mov %rax, %rsi
        call parse_size
        test %edx, %edx
        jz .Lp_next
        test $0xfff, %eax               /* whole blocks, 4K..64K, else ignored */
        jnz .Lp_next
        lea -DEFAULT_DISK_IO(%rax), %rcx
        cmp $(DISK_IO_MAX - DEFAULT_DISK_IO), %rcx
        ja .Lp_next
        mov %rax, CB + CB_DISK_IO
        jmp .Lp_next

11:     lea str_virtio_mmio(%rip), %rdi
        call starts_with
        test %rax, %rax
        jz 12f
        mov %rax, %rsi
        call parse_mmio
        jmp .Lp_next

12:     lea str_pattern(%rip), %rdi
        call starts_with
        test %rax, %rax
        jz .Lp_next
        mov %rax, %rsi                  /* the value; starts_with leaves RSI alone */
        lea str_random(%rip), %rdi
        call starts_with
        test %rax, %rax
        jz 3f
        cmpb $' ', (%rax)               /* whole word only */
        ja 3f
        movq $PATTERN_RANDOM, CB + CB_PATTERN
        jmp .Lp_next
3:      lea str_zero(%rip), %rdi
        call starts_with
        test %rax, %rax
        jz 8f
        cmpb $' ', (%rax)
        ja .Lp_next
        movq $PATTERN_ZERO, CB + CB_PATTERN
        jmp .Lp_next
8:      lea str_compressible(%rip), %rdi
        call starts_with
        test %rax, %rax
        jz .Lp_next
        cmpb $' ', (%rax)
        ja .Lp_next
        movq $PATTERN_COMPRESSIBLE, CB + CB_PATTERN

.Lp_next:
        mov %rbx, %rsi                  /* skip the rest of the token */
4:      cmpb $' ', (%rsi)
        jbe .Lp_skip
        inc %rsi
        jmp 4b
.Lp_done:
        pop %rbx
        ret

/*
 * starts_with: RSI = text, RDI = NUL-terminated prefix.  Returns RAX = the
 * text just after the prefix, or 0 if the text does not start with it.
 * RSI is left unchanged.
 */
starts_with:
        mov %rsi, %rax
1:      movzbl (%rdi), %ecx
        test %ecx, %ecx
        jz 2f
        cmp %cl, (%rax)
        jne 3f
        inc %rax
        inc %rdi
        jmp 1b
2:      ret
3:      xor %eax, %eax
        ret

/*
 * parse_size: RSI = decimal digits, optional K/M/G (either case), then the
 * end of the token.  Returns EDX = 1 and RAX = the value, or EDX = 0.
 */
parse_size:
        call parse_number
        cmpb $' ', (%rsi)               /* nothing else may follow */
        jbe 1f
        xor %edx, %edx
1:      ret

/*
 * parse_number: like parse_size, but anything may follow.  Returns EDX = 1,
 * RAX = the value and RSI = just after it, or EDX = 0 if there is no digit.
 */
parse_number:
        xor %eax, %eax
        xor %r8d, %r8d                  /* digits seen */
1:      movzbl (%rsi), %edx
        sub $'0', %edx
        cmp $9, %edx
        ja 2f
        imul $10, %rax, %rax
        add %rdx, %rax
        inc %rsi
        inc %r8d
        jmp 1b
2:      test %r8d, %r8d
        jz 6f
        movzbl (%rsi), %edx
        or $0x20, %edx                  /* lower case; NUL and ' ' both become ' ' */
        xor %ecx, %ecx
        cmp $'k', %edx
        jne 3f
        mov $10, %ecx
3:      cmp $'m', %edx
        jne 4f
        mov $20, %ecx
4:      cmp $'g', %edx
        jne 5f
        mov $30, %ecx
5:      test %ecx, %ecx
        jz 7f
        shl %cl, %rax
        inc %rsi
7:      mov $1, %edx
        ret
6:      xor %edx, %edx
        ret

/*
 * parse_mmio: RSI = the value of a virtio_mmio.device= token, Linux's
 * SIZE@0xBASE:IRQ[:ID].  Keeps BASE in the CB_MMIO list (at most MAX_MMIO);
 * a malformed token, or a BASE the identity map does not reach (4 GiB and
 * above), is ignored.  The device itself is not touched here: only
 * disk_setup looks at it, and only with disk=.
 */
parse_mmio:
        call parse_number               /* SIZE: any (Linux's tokens say 512 or 4K) */
        test %edx, %edx
        jz 5f
        cmpb $'@', (%rsi)
        jne 5f
        cmpb $'0', 1(%rsi)
        jne 5f
        movzbl 2(%rsi), %eax
        or $0x20, %eax
        cmp $'x', %eax
        jne 5f
        add $3, %rsi
        xor %eax, %eax                  /* BASE, hexadecimal */
        xor %r8d, %r8d                  /* digits seen */
1:      movzbl (%rsi), %ecx
        lea -'0'(%rcx), %edx
        cmp $9, %edx
        jbe 2f
        or $0x20, %ecx
        lea -'a'(%rcx), %edx
        cmp $5, %edx
        ja 3f
        add $10, %edx
2:      cmp $0x0fffffff, %rax           /* below 4 GiB: the identity map ends there */
        ja 5f
        shl $4, %rax
        add %rdx, %rax
        inc %rsi
        inc %r8d
        jmp 1b
3:      test %r8d, %r8d
        jz 5f
        mov %rax, %r9
        cmpb $':', (%rsi)
        jne 5f
        inc %rsi
        xor %ecx, %ecx                  /* IRQ: decimal, not used (no interrupts) */
4:      movzbl (%rsi), %eax
        sub $'0', %eax
        cmp $9, %eax
        ja 6f
        inc %rsi
        inc %ecx
        jmp 4b
6:      test %ecx, %ecx
        jz 5f
        cmpb $':', (%rsi)               /* an optional :ID follows, ignored */
        je 7f
        cmpb $' ', (%rsi)
        ja 5f
7:      mov CB + CB_NMMIO, %rax
        cmp $MAX_MMIO, %rax
        jae 5f
        mov %r9, CB + CB_MMIO(, %rax, 8)
        incq CB + CB_NMMIO
5:      ret

/* RDTSC into \reg as one 64-bit number; clobbers RAX, RDX. */
.macro RDTSC64 reg
        rdtsc
        shl $32, %rdx
        or %rdx, %rax
        mov %rax, \reg
.endm

/*
 * calibrate_tsc: returns RAX = TSC ticks per second, measured against 50 ms of
 * PIT channel 2 in mode 0 (its output, port 0x61 bit 5, rises at terminal
 * count).
 *
 * The host may deschedule the vCPU at any moment, which would stretch or
 * shrink the measured interval, so both ends are bracketed by TSC reads: the
 * start lies between the TSC read before and after the port write that starts
 * the count, the end between the TSC read before the last poll that saw OUT2
 * low and the one after the first poll that saw it high.  An attempt whose two
 * brackets add up to more than 1/2048 of the interval (~0.05%) is retried, up
 * to CAL_TRIES times; failing that, the tightest attempt is used.  If OUT2
 * never rises (no PIT), it falls back to CPUID leaf 0x16, then 2000 MHz, and
 * says so.
 */
        .equ CAL_TRIES, 8
calibrate_tsc:
        push %rbx
        push %r12
        push %r13
        push %r14
        push %r15
        mov $-1, %r14                   /* tightest bracket so far */
        xor %r15d, %r15d                /* its frequency */
        mov $CAL_TRIES, %r12d

.Lcal_try:
        in $0x61, %al
        and $0xfc, %al                  /* speaker data off */
        or $0x01, %al                   /* channel 2 gate on */
        out %al, $0x61
        mov $0xb0, %al                  /* channel 2, lo/hi byte, mode 0, binary */
        out %al, $0x43
        mov $(PIT_COUNT & 0xff), %al
        out %al, $0x42
        RDTSC64 %rbx
        mov $(PIT_COUNT >> 8), %al
        out %al, $0x42                  /* counting starts with the high byte */
        RDTSC64 %r13
        mov %r13, %r11
        sub %rbx, %r11                  /* R11 = width of the start bracket */
        add %rbx, %r13
        rcr $1, %r13                    /* R13 = start: middle of the bracket */
        mov %rbx, %r10                  /* before the last low poll: the start at first */

1:      RDTSC64 %r9
        in $0x61, %al
        test $0x20, %al
        jnz 2f
        mov %r9, %r10
        sub %r13, %r9
        shr $34, %r9                    /* > 2^34 ticks: seconds at any sane clock */
        jnz .Lcal_timeout
        jmp 1b

2:      RDTSC64 %r9                     /* the edge lies in (R10, R9) */
        cmp %rbx, %r10                  /* OUT2 never seen low: a descheduled vCPU, */
        je 6f                           /* or no port 0x61 (QEMU's microvm): try again */
        mov %r9, %rcx
        sub %r10, %rcx
        add %rcx, %r11                  /* R11 = total uncertainty */
        add %r10, %r9
        rcr $1, %r9                     /* end: middle of the bracket */
        sub %r13, %r9                   /* R9 = ticks in PIT_COUNT PIT ticks */
        mov %r9, %rax
        mov $PIT_HZ, %ecx
        mul %rcx
        mov $PIT_COUNT, %ecx
        div %rcx
        cmp %r14, %r11
        jae 3f
        mov %r11, %r14
        mov %rax, %r15
3:      shl $9, %r11                    /* within 1/512 of the interval */
        cmp %r9, %r11                   /* tight enough? */
        jb .Lcal_done
6:      dec %r12d
        jnz .Lcal_try
        test %r15, %r15                 /* no attempt saw OUT2 low then high */
        jz .Lcal_timeout

.Lcal_done:
        mov %r15, %rax
        pop %r15
        pop %r14
        pop %r13
        pop %r12
        pop %rbx
        ret

.Lcal_timeout:
        xor %eax, %eax
        cpuid
        cmp $0x16, %eax
        jb 4f
        mov $0x16, %eax                 /* processor base frequency, MHz */
        xor %ecx, %ecx
        cpuid
        and $0xffff, %eax
        jnz 5f
4:      mov $2000, %eax
5:      imul $1000000, %rax, %r15
        sub $LINE_BUF, %rsp
        mov %rsp, %rdi
        lea msg_pit_timeout(%rip), %rsi
        call put_str
        mov %r15, %rax
        xor %edx, %edx
        mov $1000000, %ecx
        div %rcx
        call put_dec
        lea msg_start_mhz(%rip), %rsi
        call put_str
        mov %rsp, %rsi
        call send_line
        add $LINE_BUF, %rsp
        jmp .Lcal_done

/*
 * worker (every CPU): R12 = CPU index.  Never returns.
 */
worker:
        mov CB + CB_NCPUS, %rcx
        cmp %rcx, %r12
        jb 1f
idle:   pause                           /* more vCPUs than announced: stay out of the way */
        jmp idle

1:      sub $FRAME_SIZE, %rsp
        mov %rsp, %rbp

        /* This CPU's share of the pages; the last CPU takes the remainder. */
        mov CB + CB_WSS_PAGES, %rax
        xor %edx, %edx
        div %rcx
        mov %rax, %rsi
        imul %r12, %rax
        mov %rax, F_LO(%rbp)
        lea -1(%rcx), %rdx
        cmp %rdx, %r12
        jne 2f
        mov CB + CB_WSS_PAGES, %rsi
        sub %rax, %rsi
2:      mov %rsi, F_N(%rbp)

        /* This CPU's share of the rate; CPU 0 takes the remainder. */
        mov CB + CB_RATE, %rax
        xor %edx, %edx
        div %rcx
        test %r12, %r12
        jnz 3f
        add %rdx, %rax
3:      mov %rax, F_RATE(%rbp)

        /* Backlogs are kept up to a quarter of a second (4096 * 4 = 2^14), at least CHUNK pages. */
        shr $14, %rax
        cmp $CHUNK, %rax
        jae 4f
        mov $CHUNK, %eax
4:      mov %rax, F_CAPW(%rbp)
        movq $(VERIFY_RATE >> 14), F_CAPV(%rbp)

        mov CB + CB_TSC_HZ, %rax
        shl $12, %rax
        mov %rax, F_DENOM(%rbp)
        mov %r12, %rax
        shl $6, %rax                    /* * PC_SIZE */
        add $(CB + CB_PERCPU), %rax
        mov %rax, F_PC(%rbp)
        xor %eax, %eax
        mov %rax, F_CREDW(%rbp)
        mov %rax, F_CURW(%rbp)
        mov %rax, F_CREDV(%rbp)
        mov %rax, F_CURV(%rbp)
        mov %rax, F_PASS(%rbp)
        mov %rax, F_LASTW(%rbp)
        mov %rax, F_DCREDW(%rbp)
        mov %rax, F_DCURW(%rbp)
        mov %rax, F_DCREDV(%rbp)
        mov %rax, F_DCURV(%rbp)
        mov %rax, F_DWRITTEN(%rbp)
        mov %rax, F_DLASTW(%rbp)
        mov %rax, F_DSWEEPS(%rbp)

        /* The disk's pacing (CPU 0): the sweep at max(disk-rate, 16 MiB/s); backlogs
         * kept up to a quarter of a second, at least a request's worth (16 blocks). */
        mov CB + CB_DISK_RATE, %rax
        mov %rax, %rcx
        shr $14, %rcx
        cmp $16, %rcx
        jae 9f
        mov $16, %ecx
9:      mov %rcx, F_DCAPW(%rbp)
        cmp $DISK_VERIFY_MIN, %rax
        jae 10f
        mov $DISK_VERIFY_MIN, %eax
10:     mov %rax, F_DVRATE(%rbp)
        shr $14, %rax
        mov %rax, F_DCAPV(%rbp)

        /* First fill: generation 1 everywhere. */
        xor %ebx, %ebx
5:      cmp F_N(%rbp), %rbx
        jae 6f
        mov F_LO(%rbp), %r13
        add %rbx, %r13
        mov %r13, %rdi
        mov $1, %esi
        call write_page
        movl $1, GEN_TABLE(, %r13, 4)
        inc %rbx
        jmp 5b

        /* CPU 0 then fills the disk, before the others may start. */
6:      test %r12, %r12
        jnz 11f
        cmpq $0, CB + CB_DISK_BLOCKS
        je 11f
        call disk_fill

        /* Wait until every CPU has filled its share, so the pass lines start together. */
11:     lock incq CB + CB_FILLED
7:      mov CB + CB_FILLED, %rax
        cmp CB + CB_NCPUS, %rax
        jae 8f
        pause
        jmp 7b

8:      RDTSC64 F_T0(%rbp)
        mov %rax, F_PREVT(%rbp)
        mov %rax, F_LASTT(%rbp)
        add CB + CB_TSC_HZ, %rax
        mov %rax, F_NEXT(%rbp)

/*
 * The main loop.  R14 = now (TSC), R15 = ticks since F_T0.  Each round does at
 * most CHUNK pages of each kind of work, so CPU 0 looks at the clock often.
 */
main_loop:
        RDTSC64 %r14
        /* The clock: it never goes backwards, and the largest step between two rounds
         * (normally the time one round takes; a stop or a migration's downtime shows here,
         * or nothing when the TSC is carried over frozen) is reported on the pass line. */
        sub F_PREVT(%rbp), %rax
        jae 10f
        lock incq CB + CB_CLOCKBACK
        xor %eax, %eax
10:     mov F_PC(%rbp), %rcx
        cmp PC_MAXGAP(%rcx), %rax
        jbe 11f
        mov %rax, PC_MAXGAP(%rcx)
11:     mov %r14, F_PREVT(%rbp)
        mov %r14, %rax
        sub F_T0(%rbp), %rax
        mov %rax, %r15

        /* Dirtying: pages due = rate * elapsed / (tsc_hz * 4096). */
        mov F_RATE(%rbp), %rax
        mul %r15
        divq F_DENOM(%rbp)
        mov %rax, %rcx
        sub F_CREDW(%rbp), %rcx         /* backlog */
        cmp F_CAPW(%rbp), %rcx
        jbe 1f
        mov F_CAPW(%rbp), %rcx          /* too far behind (paused?): forget the excess */
        sub %rcx, %rax
        mov %rax, F_CREDW(%rbp)
1:      cmp $CHUNK, %rcx
        jbe 2f
        mov $CHUNK, %ecx
2:      mov %rcx, %rbx
3:      test %rbx, %rbx
        jz 4f
        call rewrite_next
        dec %rbx
        jmp 3b

        /* Verification sweep, paced the same way at VERIFY_RATE. */
4:      mov $VERIFY_RATE, %eax
        mul %r15
        divq F_DENOM(%rbp)
        mov %rax, %rcx
        sub F_CREDV(%rbp), %rcx
        cmp F_CAPV(%rbp), %rcx
        jbe 5f
        mov F_CAPV(%rbp), %rcx
        sub %rcx, %rax
        mov %rax, F_CREDV(%rbp)
5:      cmp $CHUNK, %rcx
        jbe 6f
        mov $CHUNK, %ecx
6:      mov %rcx, %rbx
7:      test %rbx, %rbx
        jz 8f
        call verify_next
        dec %rbx
        jmp 7b

8:      test %r12, %r12                 /* CPU 0 does the disk and reports once a second */
        jnz 9f
        cmpq $0, CB + CB_DISK_BLOCKS
        je 12f
        call disk_work
12:     cmp F_NEXT(%rbp), %r14
        jb 9f
        call pass_line
9:      pause
        jmp main_loop

/*
 * rewrite_next: check the lines of the next page of the share that are about
 * to be overwritten (lines 0 to lines-1; the others are left to the sweep)
 * against its generation, then write them with the next generation.  Part of
 * the worker, not a helper: uses the worker frame (RBP) and R13 as scratch.
 */
rewrite_next:
        mov F_CURW(%rbp), %r13
        add F_LO(%rbp), %r13
        mov %r13, %rdi
        mov GEN_TABLE(, %r13, 4), %esi
        xor %edx, %edx                  /* the lines about to be overwritten */
        mov CB + CB_LINES, %ecx
        call verify_lines
        test %rax, %rax
        jz 1f
        mov %r13, %rdi
        call report_corrupt
1:      mov GEN_TABLE(, %r13, 4), %esi
        inc %esi
        mov %esi, GEN_TABLE(, %r13, 4)
        mov %r13, %rdi
        xor %edx, %edx
        mov CB + CB_LINES, %ecx
        call write_lines
        mov F_PC(%rbp), %rax
        incq PC_WRITTEN(%rax)
        incq F_CREDW(%rbp)
        mov F_CURW(%rbp), %rax
        inc %rax
        cmp F_N(%rbp), %rax
        jb 2f
        xor %eax, %eax
2:      mov %rax, F_CURW(%rbp)
        ret

/*
 * verify_next: check the next page of the verification sweep.  A bad page is
 * reported and rewritten with what it should hold, so it is reported once.
 * Like rewrite_next, uses RBP's frame and R13.
 */
verify_next:
        mov F_CURV(%rbp), %r13
        add F_LO(%rbp), %r13
        mov %r13, %rdi
        mov GEN_TABLE(, %r13, 4), %esi
        call verify_page
        test %rax, %rax
        jz 1f
        mov %r13, %rdi
        call report_corrupt
        mov %r13, %rdi
        mov GEN_TABLE(, %r13, 4), %esi
        call write_page
1:      incq F_CREDV(%rbp)
        mov F_CURV(%rbp), %rax
        inc %rax
        cmp F_N(%rbp), %rax
        jb 2f
        mov F_PC(%rbp), %rcx            /* wrapped: one more sweep of this share */
        incq PC_SWEEPS(%rcx)
        xor %eax, %eax
2:      mov %rax, F_CURV(%rbp)
        ret

/*
 * pass_line (CPU 0): R14 = now.  Prints
 *   tern-guest: pass N rate RMiB/s ok sweeps S gap G us
 *   tern-guest: pass N rate RMiB/s FAIL sweeps S corrupt K [clock-backwards B] gap G us
 */
pass_line:
        push %rbx
        push %r13

        /* Pages rewritten by all CPUs (R8) and the fewest sweeps (R13). */
        mov CB + CB_NCPUS, %rcx
        mov $(CB + CB_PERCPU), %edx
        xor %r8d, %r8d
        mov $-1, %r13
1:      add PC_WRITTEN(%rdx), %r8
        mov PC_SWEEPS(%rdx), %rax
        cmp %r13, %rax
        jae 2f
        mov %rax, %r13
2:      add $PC_SIZE, %rdx
        dec %rcx
        jnz 1b

        /* MiB/s of pages, and of disk blocks, since the previous line. */
        mov %r8, %rax
        sub F_LASTW(%rbp), %rax
        mov %r8, F_LASTW(%rbp)
        call mib_per_second
        mov %rax, %rbx
        mov F_DWRITTEN(%rbp), %rax
        sub F_DLASTW(%rbp), %rax
        add %rax, F_DLASTW(%rbp)
        call mib_per_second
        mov %rax, F_DRATE(%rbp)
        mov %r14, F_LASTT(%rbp)

        /* Next line a second after this one was due; after a long stall, a second from now. */
        mov F_NEXT(%rbp), %rax
        add CB + CB_TSC_HZ, %rax
        cmp %r14, %rax
        ja 3f
        mov %r14, %rax
        add CB + CB_TSC_HZ, %rax
3:      mov %rax, F_NEXT(%rbp)
        incq F_PASS(%rbp)

        sub $LINE_BUF, %rsp
        mov %rsp, %rdi
        lea msg_pass(%rip), %rsi
        call put_str
        mov F_PASS(%rbp), %rax
        call put_dec
        lea msg_pass_rate(%rip), %rsi
        call put_str
        mov %rbx, %rax
        call put_dec
        mov CB + CB_CORRUPT, %rax
        or CB + CB_CLOCKBACK, %rax
        jnz 4f
        lea msg_pass_ok(%rip), %rsi
        call put_str
        mov %r13, %rax
        call put_dec
        call pass_disk
        jmp 5f
4:      lea msg_pass_fail(%rip), %rsi
        call put_str
        mov %r13, %rax
        call put_dec
        call pass_disk
        lea msg_pass_corrupt(%rip), %rsi
        call put_str
        mov CB + CB_CORRUPT, %rax
        call put_dec
        cmpq $0, CB + CB_CLOCKBACK
        je 5f
        lea msg_pass_clockback(%rip), %rsi
        call put_str
        mov CB + CB_CLOCKBACK, %rax
        call put_dec
        /* " gap G us": the largest clock step any CPU saw since the last line (cleared). */
5:      mov CB + CB_NCPUS, %rcx
        mov $(CB + CB_PERCPU), %edx
        xor %r8d, %r8d
8:      mov PC_MAXGAP(%rdx), %rax
        cmp %r8, %rax
        jbe 9f
        mov %rax, %r8
9:      movq $0, PC_MAXGAP(%rdx)
        add $PC_SIZE, %rdx
        dec %rcx
        jnz 8b
        lea msg_pass_gap(%rip), %rsi
        call put_str
        mov %r8, %rax
        mov $1000000, %ecx
        mul %rcx
        divq CB + CB_TSC_HZ
        call put_dec
        lea msg_pass_us(%rip), %rsi
        call put_str
        mov %rsp, %rsi
        call send_line
        add $LINE_BUF, %rsp

        mov CB + CB_REBOOT, %rax        /* reboot=N: reset after the Nth line */
        test %rax, %rax
        jz 6f
        cmp F_PASS(%rbp), %rax
        ja 6f
        sub $LINE_BUF, %rsp
        mov %rsp, %rdi
        lea msg_reboot(%rip), %rsi
        call put_str
        mov %rsp, %rsi
        call send_line
        add $LINE_BUF, %rsp
        mov $0xfe, %al                  /* i8042: pulse the CPU reset line */
        out %al, $0x64
7:      pause                           /* the reset takes effect outside the guest */
        jmp 7b
6:      pop %r13
        pop %rbx
        ret

/*
 * mib_per_second (CPU 0, pass_line): RAX = 4 KiB units done since the previous
 * pass line, R14 = now.  Returns RAX = MiB/s, that is units * tsc_hz / (ticks
 * * 256), rounded to nearest.
 */
mib_per_second:
        mulq CB + CB_TSC_HZ
        mov %r14, %rcx
        sub F_LASTT(%rbp), %rcx
        shl $7, %rcx                    /* half the divisor */
        add %rcx, %rax
        adc $0, %rdx
        shl $1, %rcx
        div %rcx
        ret

/* pass_disk (CPU 0, pass_line): RDI = line buffer.  Appends " disk DMiB/s dsweeps Q" if the disk is on. */
pass_disk:
        cmpq $0, CB + CB_DISK_BLOCKS
        je 1f
        lea msg_pass_disk(%rip), %rsi
        call put_str
        mov F_DRATE(%rbp), %rax
        call put_dec
        lea msg_pass_dsweeps(%rip), %rsi
        call put_str
        mov F_DSWEEPS(%rbp), %rax
        call put_dec
1:      ret

/*
 * report_corrupt: RDI = page index.  Counts it and prints
 * "tern-guest: CORRUPT page N" for the first MAX_CORRUPT_LINES.
 * report_block: the same for a disk block ("CORRUPT block N").
 * report: RSI = the line's start, RDI = a number, RDX = 0 or a second
 * string and RCX = a second number.  Pages, blocks and disk errors share
 * the count and the limit on lines printed.
 */
report_corrupt:
        lea msg_corrupt(%rip), %rsi
        xor %edx, %edx
        jmp report
report_block:
        lea msg_corrupt_block(%rip), %rsi
        xor %edx, %edx
report:
        push %rbx
        push %r12
        push %r13
        push %r14
        mov %rdi, %rbx
        mov %rsi, %r12
        mov %rdx, %r13
        mov %rcx, %r14
        mov $1, %eax
        lock xadd %rax, CB + CB_CORRUPT
        cmp $MAX_CORRUPT_LINES, %rax
        jae 1f
        sub $LINE_BUF, %rsp
        mov %rsp, %rdi
        mov %r12, %rsi
        call put_str
        mov %rbx, %rax
        call put_dec
        test %r13, %r13
        jz 2f
        mov %r13, %rsi
        call put_str
        mov %r14, %rax
        call put_dec
2:      mov %rsp, %rsi
        call send_line
        add $LINE_BUF, %rsp
1:      pop %r14
        pop %r13
        pop %r12
        pop %rbx
        ret

/* ---------------------------------------------------------------------------
 * Page contents.  The hot code: four xorshift64 lanes in R8-R11.
 */

/* One xorshift64 (13, 7, 17) step of lane \x; RAX is scratch. */
.macro XORSHIFT x
        mov \x, %rax
        shl $13, %rax
        xor %rax, \x
        mov \x, %rax
        shr $7, %rax
        xor %rax, \x
        mov \x, %rax
        shl $17, %rax
        xor %rax, \x
.endm

/* splitmix64's output mix of \z, made odd so that the xorshift state is never 0. */
.macro MIX z
        mov \z, %rax
        shr $30, %rax
        xor %rax, \z
        movabs $0xBF58476D1CE4E5B9, %rax
        imul %rax, \z
        mov \z, %rax
        shr $27, %rax
        xor %rax, \z
        movabs $0x94D049BB133111EB, %rax
        imul %rax, \z
        mov \z, %rax
        shr $31, %rax
        xor %rax, \z
        or $1, \z
.endm

/* seed_lanes: RDX = page header; sets R8-R11 (lanes 0-3).  Clobbers RAX, RCX. */
seed_lanes:
        movabs $0x9E3779B97F4A7C15, %rcx
        lea (%rdx, %rcx), %r8
        lea (%r8, %rcx), %r9
        lea (%r9, %rcx), %r10
        lea (%r10, %rcx), %r11
        MIX %r8
        MIX %r9
        MIX %r10
        MIX %r11
        ret

/*
 * LINES_SETUP: RDI = page index, ESI = generation, EDX = first line, ECX = end
 * line (first < end <= 64)  ->  RDX = header, RDI = address of the first line,
 * ECX = number of lines, R8 = first line.  Clobbers RAX.
 */
.macro LINES_SETUP
        mov %edx, %r8d
        sub %edx, %ecx
        mov %esi, %edx
        shl $32, %rdx
        or %rdi, %rdx
        shl $12, %rdi
        add $WS_BASE, %rdi
        mov %r8d, %eax
        shl $6, %eax
        add %rax, %rdi
.endm

/*
 * pattern=compressible, after LINES_SETUP: ECX = words, R8 = index of the first
 * word, R9 = the filler (every byte (p mod 128) + 1), R10 = random words per
 * page (n), RSI = the splitmix64 increment.
 */
.macro COMP_SETUP
        shl $3, %ecx
        shl $3, %r8d
        mov %edx, %eax
        and $0x7f, %eax
        inc %eax
        movabs $0x0101010101010101, %r9
        imul %rax, %r9
        mov CB + CB_NRAND, %r10
        movabs $0x9E3779B97F4A7C15, %rsi
.endm

/*
 * COMP_START: R8 = index i of the first word (>= 1), RDX = header  ->
 * RDX = header + i * increment, R8 = ((i - 1) * n + 511) mod 512.  Word i is
 * random when R8 + n reaches 512 (then R8 -= 512), so words 1-511 hold
 * exactly n random words, spread evenly.  Clobbers RAX, R11.
 */
.macro COMP_START
        mov %r8, %r11
        imul %rsi, %r11
        add %r11, %rdx
        lea -1(%r8), %rax
        imul %r10, %rax
        add $511, %eax
        and $511, %eax
        mov %eax, %r8d
.endm

/*
 * write_lines: RDI = page index, ESI = generation, EDX = first line, ECX = end
 * line (first < end <= 64).  Writes those lines of the generation's contents.
 */
write_lines:
        LINES_SETUP
        mov CB + CB_PATTERN, %rax
        cmp $PATTERN_ZERO, %rax
        je .Lw_zero
        cmp $PATTERN_COMPRESSIBLE, %rax
        je .Lw_comp
write_random:                           /* pattern=random; gen_block enters here */
        push %rcx                       /* lines */
        push %r8                        /* first line */
        call seed_lanes
        pop %rcx
        add %ecx, %ecx                  /* each line is two rounds of the four lanes */
        jz 2f
1:      XORSHIFT %r8                    /* skip the lines before the first */
        XORSHIFT %r9
        XORSHIFT %r10
        XORSHIFT %r11
        dec %ecx
        jnz 1b
2:      pop %rcx
        add %ecx, %ecx
        mov %rdi, %rsi
3:      XORSHIFT %r8
        mov %r8, (%rdi)
        XORSHIFT %r9
        mov %r9, 8(%rdi)
        XORSHIFT %r10
        mov %r10, 16(%rdi)
        XORSHIFT %r11
        mov %r11, 24(%rdi)
        add $32, %rdi
        dec %ecx
        jnz 3b
        test $0xfff, %esi               /* line 0 written? */
        jnz 4f
        mov %rdx, (%rsi)                /* the header replaces lane 0's first word */
4:      ret

.Lw_zero:
        shl $3, %ecx                    /* words */
        test %r8d, %r8d
        jnz 5f
        mov %rdx, (%rdi)
        add $8, %rdi
        dec %ecx
5:      xor %eax, %eax
        rep stosq
        ret

.Lw_comp:
        COMP_SETUP
        test %r8d, %r8d
        jnz 6f
        mov %rdx, (%rdi)                /* word 0: the header */
        add $8, %rdi
        inc %r8d
        dec %ecx
6:      COMP_START
7:      add %r10d, %r8d
        cmp $512, %r8d
        jb 8f
        sub $512, %r8d
        mov %rdx, %r11                  /* random word: splitmix64(header + i * increment) */
        MIX %r11
        mov %r11, (%rdi)
        jmp 9f
8:      mov %r9, (%rdi)
9:      add %rsi, %rdx
        add $8, %rdi
        dec %ecx
        jnz 7b
        ret

/*
 * verify_lines: like write_lines, but compares.  Returns RAX = 0 if those lines
 * hold exactly the generation's contents.
 */
verify_mismatch:
        mov $1, %eax
        ret
verify_lines:
        LINES_SETUP
        mov CB + CB_PATTERN, %rax
        cmp $PATTERN_ZERO, %rax
        je .Lv_zero
        cmp $PATTERN_COMPRESSIBLE, %rax
        je .Lv_comp
        push %rcx                       /* lines */
        push %r8                        /* first line */
        call seed_lanes
        pop %rcx
        add %ecx, %ecx
        jz 2f
1:      XORSHIFT %r8                    /* skip the lines before the first */
        XORSHIFT %r9
        XORSHIFT %r10
        XORSHIFT %r11
        dec %ecx
        jnz 1b
        pop %rcx
        add %ecx, %ecx
        jmp 3f
2:      pop %rcx
        add %ecx, %ecx
        cmp %rdx, (%rdi)                /* line 0: the header ... */
        jne verify_mismatch
        XORSHIFT %r8                    /* ... replaces lane 0's first output */
        XORSHIFT %r9
        cmp %r9, 8(%rdi)
        jne verify_mismatch
        XORSHIFT %r10
        cmp %r10, 16(%rdi)
        jne verify_mismatch
        XORSHIFT %r11
        cmp %r11, 24(%rdi)
        jne verify_mismatch
        add $32, %rdi
        dec %ecx
3:      XORSHIFT %r8
        cmp %r8, (%rdi)
        jne verify_mismatch
        XORSHIFT %r9
        cmp %r9, 8(%rdi)
        jne verify_mismatch
        XORSHIFT %r10
        cmp %r10, 16(%rdi)
        jne verify_mismatch
        XORSHIFT %r11
        cmp %r11, 24(%rdi)
        jne verify_mismatch
        add $32, %rdi
        dec %ecx
        jnz 3b
        xor %eax, %eax
        ret

.Lv_zero:
        shl $3, %ecx                    /* words */
        test %r8d, %r8d
        jnz 4f
        cmp %rdx, (%rdi)
        jne verify_mismatch
        add $8, %rdi
        dec %ecx
4:      xor %eax, %eax                  /* the OR of the other words */
5:      or (%rdi), %rax
        add $8, %rdi
        dec %ecx
        jnz 5b
        ret

.Lv_comp:
        COMP_SETUP
        test %r8d, %r8d
        jnz 6f
        cmp %rdx, (%rdi)
        jne verify_mismatch
        add $8, %rdi
        inc %r8d
        dec %ecx
6:      COMP_START
7:      add %r10d, %r8d
        cmp $512, %r8d
        jb 8f
        sub $512, %r8d
        mov %rdx, %r11
        MIX %r11
        cmp %r11, (%rdi)
        jne verify_mismatch
        jmp 9f
8:      cmp %r9, (%rdi)
        jne verify_mismatch
9:      add %rsi, %rdx
        add $8, %rdi
        dec %ecx
        jnz 7b
        xor %eax, %eax
        ret

/*
 * write_page: RDI = page index, ESI = generation.  Writes the page's whole
 * contents: lines 0 to lines-1 of generation ESI, the other lines of
 * generation 1 (lines=N leaves them as the first fill wrote them).
 */
write_page:
        mov CB + CB_LINES, %ecx
        cmp $LINES_PER_PAGE, %ecx
        je 1f
        cmp $1, %esi
        jne 2f
1:      mov $LINES_PER_PAGE, %ecx       /* one generation throughout */
        xor %edx, %edx
        jmp write_lines
2:      push %rdi
        xor %edx, %edx
        call write_lines
        pop %rdi
        mov $1, %esi
        mov CB + CB_LINES, %edx
        mov $LINES_PER_PAGE, %ecx
        jmp write_lines

/* verify_page: RDI = page index, ESI = generation.  Returns RAX = 0 if the whole page is exactly as write_page writes it. */
verify_page:
        mov CB + CB_LINES, %ecx
        cmp $LINES_PER_PAGE, %ecx
        je 1f
        cmp $1, %esi
        jne 2f
1:      mov $LINES_PER_PAGE, %ecx
        xor %edx, %edx
        jmp verify_lines
2:      push %rdi
        xor %edx, %edx
        call verify_lines
        pop %rdi
        test %rax, %rax
        jnz 3f
        mov $1, %esi
        mov CB + CB_LINES, %edx
        mov $LINES_PER_PAGE, %ecx
        jmp verify_lines
3:      ret

/* ratio=R (1..16): random words among words 1-511 of a compressible page,
 * measured so that a page compresses about R:1 with zlib level 1 (guest/README.md). */
ratio_words:
        .word 512, 203, 123, 86, 65, 55, 46, 40, 36, 34, 32, 25, 23, 22, 20, 18

/* ---------------------------------------------------------------------------
 * The disk: a virtio-blk device behind a virtio-mmio transport (version 2,
 * split virtqueue), driven by CPU 0 alone.  It runs at CPL 3 like the rest of
 * the workload: an access to an address without RAM exits to the VMM from any
 * privilege level.  No interrupt is ever taken, so the driver polls the used
 * ring, one request at a time, and acknowledges InterruptStatus after each
 * completion, which keeps the device's interrupt line low.  Every register
 * access is a 32-bit mov, nothing the VMM's MMIO decoding could trip over.
 */

/*
 * disk_setup (CPU 0, at the end of setup): with disk= of at least one block,
 * takes the first virtio_mmio.device= whose registers say virtio-blk,
 * version 2, sets it up and sets CB_DISK_BLOCKS, and prints the disk line (or
 * why there is no disk workload).  Without disk= no device is touched.
 */
disk_setup:
        push %rbx
        push %r12
        push %r13
        cmpq $4096, CB + CB_DISK
        jb .Lds_ret
        xor %r12d, %r12d
1:      cmp CB + CB_NMMIO, %r12
        jae .Lds_nodev
        mov CB + CB_MMIO(, %r12, 8), %rbx
        mov VM_MAGIC(%rbx), %eax
        cmp $VIRTIO_MAGIC, %eax
        jne 2f
        mov VM_VERSION(%rbx), %eax
        cmp $2, %eax
        jne 2f
        mov VM_DEVICE_ID(%rbx), %eax
        cmp $VIRTIO_ID_BLOCK, %eax
        je 3f
2:      inc %r12
        jmp 1b

3:      mov %rbx, CB + CB_DISK_REGS
        /* Empty rings (a reboot= leaves the previous boot's), and the two
         * descriptors every request shares: 0 the header, 2 the status byte. */
        mov $VQ_DESC, %edi
        mov $(0x1000 / 8), %ecx
        xor %eax, %eax
        rep stosq
        movq $REQ_HDR, VQ_DESC
        movabs $(16 | (VRING_DESC_F_NEXT << 32) | (1 << 48)), %rax
        mov %rax, VQ_DESC + 8
        movq $REQ_STATUS, VQ_DESC + 32
        movabs $(1 | (VRING_DESC_F_WRITE << 32)), %rax
        mov %rax, VQ_DESC + 40

        /* Reset, and wait until Status reads 0 (virtio 1.x 4.2.3.1). */
        xor %eax, %eax
        mov %eax, VM_STATUS(%rbx)
        mov $1000, %ecx
4:      mov VM_STATUS(%rbx), %eax
        test %eax, %eax
        jz 5f
        pause
        dec %ecx
        jnz 4b
        lea msg_no_reset(%rip), %rsi
        jmp .Lds_fail
5:      mov $ST_ACKNOWLEDGE, %eax
        mov %eax, VM_STATUS(%rbx)
        mov $(ST_ACKNOWLEDGE | ST_DRIVER), %eax
        mov %eax, VM_STATUS(%rbx)

        /* Features: VIRTIO_F_VERSION_1 (bit 32) only, which version 2 requires. */
        xor %eax, %eax
        mov %eax, VM_DEV_FEATURES_SEL(%rbx)
        mov VM_DEV_FEATURES(%rbx), %eax /* bits 0-31: nothing wanted */
        mov $1, %eax
        mov %eax, VM_DEV_FEATURES_SEL(%rbx)
        mov VM_DEV_FEATURES(%rbx), %eax
        test $1, %al
        jnz 6f
        lea msg_no_version1(%rip), %rsi
        jmp .Lds_fail
6:      xor %eax, %eax
        mov %eax, VM_DRV_FEATURES_SEL(%rbx)
        mov %eax, VM_DRV_FEATURES(%rbx)
        inc %eax
        mov %eax, VM_DRV_FEATURES_SEL(%rbx)
        mov %eax, VM_DRV_FEATURES(%rbx)
        mov $(ST_ACKNOWLEDGE | ST_DRIVER | ST_FEATURES_OK), %eax
        mov %eax, VM_STATUS(%rbx)
        mov VM_STATUS(%rbx), %eax
        test $ST_FEATURES_OK, %al
        jnz 7f
        lea msg_no_features_ok(%rip), %rsi
        jmp .Lds_fail

        /* Queue 0: min(QueueNumMax, MAX_QUEUE) entries, rings at fixed addresses. */
7:      xor %eax, %eax
        mov %eax, VM_QUEUE_SEL(%rbx)
        mov VM_QUEUE_NUM_MAX(%rbx), %eax
        cmp $MIN_QUEUE, %eax
        jae 8f
        lea msg_small_queue(%rip), %rsi
        jmp .Lds_fail
8:      cmp $MAX_QUEUE, %eax
        jbe 9f
        mov $MAX_QUEUE, %eax
9:      mov %rax, CB + CB_DISK_QSIZE
        mov %eax, VM_QUEUE_NUM(%rbx)
        xor %ecx, %ecx
        mov $VQ_DESC, %eax
        mov %eax, VM_QUEUE_DESC(%rbx)
        mov %ecx, VM_QUEUE_DESC + 4(%rbx)
        mov $VQ_AVAIL, %eax
        mov %eax, VM_QUEUE_DRIVER(%rbx)
        mov %ecx, VM_QUEUE_DRIVER + 4(%rbx)
        mov $VQ_USED, %eax
        mov %eax, VM_QUEUE_DEVICE(%rbx)
        mov %ecx, VM_QUEUE_DEVICE + 4(%rbx)
        /* The guest polls the used ring and takes no interrupt: VRING_AVAIL_F_NO_INTERRUPT
         * asks the device not to raise one, which saves reading and acknowledging
         * InterruptStatus (two exits) per request. */
        movw $1, VQ_AVAIL
        mov $1, %eax
        mov %eax, VM_QUEUE_READY(%rbx)

        /* Capacity: two u32 reads, again if the configuration changed meanwhile. */
10:     mov VM_CONFIG_GEN(%rbx), %ecx
        mov VM_CONFIG(%rbx), %eax
        mov VM_CONFIG + 4(%rbx), %edx
        mov VM_CONFIG_GEN(%rbx), %r8d
        cmp %ecx, %r8d
        jne 10b
        shl $32, %rdx
        or %rdx, %rax
        mov %rax, CB + CB_DISK_CAP
        mov $(ST_ACKNOWLEDGE | ST_DRIVER | ST_FEATURES_OK | ST_DRIVER_OK), %eax
        mov %eax, VM_STATUS(%rbx)

        /* The working set: whole blocks, within the capacity and the generation table. */
        mov CB + CB_DISK_CAP, %r13
        shr $3, %r13                    /* blocks the device holds */
        mov $MAX_DISK_BLOCKS, %eax
        cmp %rax, %r13
        jbe 11f
        mov %rax, %r13
11:     mov CB + CB_DISK, %r12
        shr $12, %r12
        cmp %r13, %r12
        jbe 12f
        mov %r13, %r12
        sub $LINE_BUF, %rsp
        mov %rsp, %rdi
        lea msg_disk_clamped(%rip), %rsi
        call put_str
        mov %r12, %rax
        shr $8, %rax                    /* blocks to MiB */
        call put_dec
        lea msg_disk_clamped2(%rip), %rsi
        call put_str
        mov CB + CB_DISK_CAP, %rax
        shr $11, %rax                   /* sectors to MiB */
        call put_dec
        lea msg_disk_clamped3(%rip), %rsi
        call put_str
        mov %rsp, %rsi
        call send_line
        add $LINE_BUF, %rsp
12:     mov %r12, CB + CB_DISK_BLOCKS
        test %r12, %r12
        jz .Lds_ret

        sub $LINE_BUF, %rsp
        mov %rsp, %rdi
        lea msg_disk(%rip), %rsi
        call put_str
        mov CB + CB_DISK_REGS, %rax
        call put_hex
        lea msg_disk_capacity(%rip), %rsi
        call put_str
        mov CB + CB_DISK_CAP, %rax
        shr $11, %rax
        call put_dec
        lea msg_disk_wss(%rip), %rsi
        call put_str
        mov CB + CB_DISK_BLOCKS, %rax
        shr $8, %rax
        call put_dec
        lea msg_start_rate(%rip), %rsi
        call put_str
        mov CB + CB_DISK_RATE, %rax
        shr $20, %rax
        call put_dec
        lea msg_disk_io(%rip), %rsi
        call put_str
        mov CB + CB_DISK_IO, %rax
        shr $10, %rax
        call put_dec
        lea msg_disk_kib(%rip), %rsi
        call put_str
        mov %rsp, %rsi
        call send_line
        add $LINE_BUF, %rsp
.Lds_ret:
        pop %r13
        pop %r12
        pop %rbx
        ret

.Lds_fail:                              /* RSI = the reason; tell the device too */
        mov VM_STATUS(%rbx), %eax
        or $ST_FAILED, %eax
        mov %eax, VM_STATUS(%rbx)
        jmp .Lds_say
.Lds_nodev:
        lea msg_no_device(%rip), %rsi
.Lds_say:
        mov %rsi, %r12
        sub $LINE_BUF, %rsp
        mov %rsp, %rdi
        lea msg_disk_unusable(%rip), %rsi
        call put_str
        mov %r12, %rsi
        call put_str
        mov %rsp, %rsi
        call send_line
        add $LINE_BUF, %rsp
        jmp .Lds_ret

/* disk_fill (CPU 0, before the pass lines start): generation 1 in every block of the working set. */
disk_fill:
        push %rbx
        xor %ebx, %ebx
1:      cmp CB + CB_DISK_BLOCKS, %rbx
        jae 2f
        cmpq $0, CB + CB_DISK_DEAD
        jne 3f
        mov %rbx, %rdi
        mov $1, %esi
        call disk_write_run
        add %rax, %rbx
        jmp 1b
2:      sub $LINE_BUF, %rsp
        mov %rsp, %rdi
        lea msg_disk_filled(%rip), %rsi
        call put_str
        mov CB + CB_DISK_BLOCKS, %rax
        shr $8, %rax
        call put_dec
        lea msg_mib(%rip), %rsi
        call put_str
        mov %rsp, %rsi
        call send_line
        add $LINE_BUF, %rsp
3:      pop %rbx
        ret

/*
 * disk_work (CPU 0, main loop): R15 = ticks since F_T0.  The disk's part of a
 * round, paced like the pages: the rewrites due at disk-rate, then the
 * verification reads due at F_DVRATE, at most DISK_CHUNK requests of each.  A
 * request covers a whole run (disk_run), so it waits until the run is due.
 */
disk_work:
        push %rbx
        push %r13
        cmpq $0, CB + CB_DISK_DEAD
        jne 9f
        mov CB + CB_DISK_RATE, %rax
        mul %r15
        divq F_DENOM(%rbp)
        mov %rax, %r13                  /* blocks due */
        mov %rax, %rcx
        sub F_DCREDW(%rbp), %rcx        /* backlog */
        cmp F_DCAPW(%rbp), %rcx
        jbe 1f
        sub F_DCAPW(%rbp), %rax         /* too far behind (paused?): forget the excess */
        mov %rax, F_DCREDW(%rbp)
1:      mov $DISK_CHUNK, %ebx
2:      mov F_DCURW(%rbp), %rdi
        call disk_run
        mov %r13, %rcx
        sub F_DCREDW(%rbp), %rcx
        cmp %rax, %rcx
        jb 4f
        mov F_DCURW(%rbp), %rdi
        xor %esi, %esi
        call disk_write_run
        add %rax, F_DCREDW(%rbp)
        add %rax, F_DWRITTEN(%rbp)
        add F_DCURW(%rbp), %rax
        cmp CB + CB_DISK_BLOCKS, %rax
        jb 3f
        xor %eax, %eax
3:      mov %rax, F_DCURW(%rbp)
        dec %ebx
        jnz 2b

4:      mov F_DVRATE(%rbp), %rax
        mul %r15
        divq F_DENOM(%rbp)
        mov %rax, %r13
        mov %rax, %rcx
        sub F_DCREDV(%rbp), %rcx
        cmp F_DCAPV(%rbp), %rcx
        jbe 5f
        sub F_DCAPV(%rbp), %rax
        mov %rax, F_DCREDV(%rbp)
5:      mov $DISK_CHUNK, %ebx
6:      mov F_DCURV(%rbp), %rdi
        call disk_run
        mov %r13, %rcx
        sub F_DCREDV(%rbp), %rcx
        cmp %rax, %rcx
        jb 9f
        mov F_DCURV(%rbp), %rdi
        call disk_verify_run
        add %rax, F_DCREDV(%rbp)
        add F_DCURV(%rbp), %rax
        cmp CB + CB_DISK_BLOCKS, %rax
        jb 7f
        incq F_DSWEEPS(%rbp)            /* wrapped: one more sweep of the disk */
        xor %eax, %eax
7:      mov %rax, F_DCURV(%rbp)
        dec %ebx
        jnz 6b
9:      pop %r13
        pop %rbx
        ret

/* disk_run: RDI = a block.  Returns RAX = the blocks of the request that starts there: disk-io's worth, fewer at the end of the working set.  Clobbers RCX. */
disk_run:
        mov CB + CB_DISK_IO, %rax
        shr $12, %rax
        mov CB + CB_DISK_BLOCKS, %rcx
        sub %rdi, %rcx
        cmp %rcx, %rax
        jbe 1f
        mov %rcx, %rax
1:      ret

/*
 * disk_write_run: RDI = first block, ESI = 1 for the first fill (generation 1),
 * 0 for a rewrite (generation + 1).  Writes the run that starts there in one
 * request; returns RAX = its blocks.
 */
disk_write_run:
        push %rbx
        push %r12
        push %r13
        push %r14
        mov %rdi, %r12
        mov %esi, %r14d
        call disk_run
        mov %rax, %r13
        xor %ebx, %ebx
1:      lea (%r12, %rbx), %rsi
        mov BLOCK_TABLE(, %rsi, 4), %edx
        inc %edx
        test %r14d, %r14d
        jz 2f
        mov $1, %edx
2:      mov %edx, BLOCK_TABLE(, %rsi, 4)
        mov %rbx, %rdi
        shl $12, %rdi
        add $DISK_BUF, %rdi
        call gen_block
        inc %rbx
        cmp %r13, %rbx
        jb 1b
        mov $VIRTIO_BLK_T_OUT, %edi
        lea (, %r12, 8), %rsi           /* 8 sectors a block */
        mov $DISK_BUF, %edx
        mov %r13, %rcx
        shl $12, %rcx
        call disk_request
        mov %r13, %rax
        pop %r14
        pop %r13
        pop %r12
        pop %rbx
        ret

/*
 * disk_verify_run: RDI = first block.  Reads the run that starts there in one
 * request and checks every word of every block against its generation; a bad
 * block is reported and written again with what it should hold, so it is
 * reported once.  Returns RAX = the run's blocks.
 */
disk_verify_run:
        push %rbx
        push %r12
        push %r13
        mov %rdi, %r12
        call disk_run
        mov %rax, %r13
        mov $VIRTIO_BLK_T_IN, %edi
        lea (, %r12, 8), %rsi
        mov $DISK_BUF, %edx
        mov %r13, %rcx
        shl $12, %rcx
        call disk_request
        test %eax, %eax
        jnz 3f                          /* failed (and reported): nothing to check */
        xor %ebx, %ebx
1:      mov %rbx, %rdi
        shl $12, %rdi
        add $DISK_BUF, %rdi
        lea (%r12, %rbx), %rsi
        mov BLOCK_TABLE(, %rsi, 4), %edx
        call verify_block
        test %eax, %eax
        jz 2f
        lea (%r12, %rbx), %rdi
        call report_block
        mov $VIRTIO_BLK_T_OUT, %edi     /* DISK_EXPECT holds what the block should */
        lea (%r12, %rbx), %rsi
        shl $3, %rsi
        mov $DISK_EXPECT, %edx
        mov $4096, %ecx
        call disk_request
2:      inc %rbx
        cmp %r13, %rbx
        jb 1b
3:      mov %r13, %rax
        pop %r13
        pop %r12
        pop %rbx
        ret

/*
 * gen_block: RDI = where (4 KiB aligned), RSI = block b, EDX = generation g.
 * Writes the block: pattern=random's page for the header g << 32 | b, with
 * word 1 replaced by "TERNDISK" so that a block is never taken for a page.
 */
gen_block:
        shl $32, %rdx
        or %rsi, %rdx
        push %rdi
        xor %r8d, %r8d
        mov $LINES_PER_PAGE, %ecx
        call write_random
        pop %rdi
        movabs $DISK_TAG, %rax
        mov %rax, 8(%rdi)
        ret

/*
 * verify_block: RDI = a block as read, RSI = its number, EDX = its generation.
 * Returns RAX = 0 if every word is right.  DISK_EXPECT then holds the block
 * as it should be.
 */
verify_block:
        push %rdi
        mov $DISK_EXPECT, %edi
        call gen_block
        pop %rdi
        mov $DISK_EXPECT, %esi
        mov $512, %ecx
        xor %eax, %eax
        repe cmpsq
        setne %al
        ret

/*
 * disk_request: EDI = VIRTIO_BLK_T_IN or VIRTIO_BLK_T_OUT, RSI = first
 * sector, RDX = data buffer, ECX = its length.  Makes the chain of
 * descriptors 0-2 available, notifies queue 0, polls the used ring until the
 * device has served it, then acknowledges the interrupt.  Returns RAX = the
 * status byte, 0 for VIRTIO_BLK_S_OK; anything else is reported as a
 * DISK-ERROR and counted.  If the device stops serving the queue (Status
 * without DRIVER_OK, or with DEVICE_NEEDS_RESET), that is reported once and no
 * request is made from then on (RAX = -1).
 */
disk_request:
        push %rbx
        cmpq $0, CB + CB_DISK_DEAD
        jne .Ldr_dead
        mov CB + CB_DISK_REGS, %rbx
        mov %edi, REQ_HDR               /* type */
        movl $0, REQ_HDR + 4            /* reserved */
        mov %rsi, REQ_HDR + 8           /* sector */
        movb $0xff, REQ_STATUS          /* no status a device may leave */
        mov %rdx, VQ_DESC + 16          /* descriptor 1: the data */
        mov $VRING_DESC_F_NEXT, %eax
        cmp $VIRTIO_BLK_T_IN, %edi
        jne 1f
        or $VRING_DESC_F_WRITE, %eax    /* a read: the device writes the data */
1:      or $(2 << 16), %eax             /* next: descriptor 2 */
        shl $32, %rax
        or %rcx, %rax                   /* length (ECX zero-extended) */
        mov %rax, VQ_DESC + 24

        /* The chain's head in the next slot of the avail ring, then the index:
         * x86 makes the stores visible in that order, and before the notify. */
        mov CB + CB_DISK_AVAIL, %eax
        mov CB + CB_DISK_QSIZE, %ecx
        dec %ecx
        and %eax, %ecx
        movw $0, VQ_AVAIL + 4(, %rcx, 2)
        inc %eax
        mov %rax, CB + CB_DISK_AVAIL
        mov %ax, VQ_AVAIL + 2
        xor %ecx, %ecx
        mov %ecx, VM_QUEUE_NOTIFY(%rbx) /* queue 0 */

2:      mov $256, %edx                  /* polls between two looks at Status */
6:      cmp VQ_USED + 2, %ax            /* used->idx catches up when it is served */
        je 3f
        pause
        dec %edx
        jnz 6b
        mov VM_STATUS(%rbx), %ecx       /* still serving the queue? */
        and $(ST_DRIVER_OK | ST_NEEDS_RESET), %ecx
        cmp $ST_DRIVER_OK, %ecx
        jne .Ldr_broken
        jmp 2b
3:      movzbl REQ_STATUS, %eax
        test %eax, %eax
        jz 5f
        push %rax
        mov %rax, %rdi
        lea msg_disk_error(%rip), %rsi
        lea msg_disk_error2(%rip), %rdx
        mov REQ_HDR + 8, %rcx
        call report
        pop %rax
5:      pop %rbx
        ret

.Ldr_broken:
        movq $1, CB + CB_DISK_DEAD
        mov VM_INT_STATUS(%rbx), %ecx   /* keep the line low all the same */
        mov %ecx, VM_INT_ACK(%rbx)
        mov VM_STATUS(%rbx), %edi
        lea msg_disk_dead(%rip), %rsi
        lea msg_disk_error2(%rip), %rdx
        mov REQ_HDR + 8, %rcx
        call report
.Ldr_dead:
        mov $-1, %rax
        pop %rbx
        ret

/* ---------------------------------------------------------------------------
 * Output on COM1.
 */

/* put_str: appends the NUL-terminated string at RSI to the buffer at RDI (advanced). */
put_str:
1:      lodsb
        test %al, %al
        jz 2f
        stosb
        jmp 1b
2:      ret

/* put_dec: appends RAX in decimal to the buffer at RDI (advanced).  put_hex: in hexadecimal. */
put_hex:
        mov $16, %ecx
        jmp put_num
put_dec:
        mov $10, %ecx
put_num:
        sub $32, %rsp                   /* digits are produced backwards into here */
        lea 32(%rsp), %rsi
1:      xor %edx, %edx
        div %rcx
        add $'0', %dl
        cmp $'9', %dl
        jbe 2f
        add $('a' - '9' - 1), %dl
2:      dec %rsi
        mov %dl, (%rsi)
        test %rax, %rax
        jnz 1b
        lea 32(%rsp), %rcx
        sub %rsi, %rcx
        rep movsb
        add $32, %rsp
        ret

/* send_line: RSI = start of a line, RDI = its end.  Adds "\n" and prints it whole, under the lock. */
send_line:
        movb $'\n', (%rdi)
        inc %rdi
        mov %rdi, %r9
        sub %rsi, %r9                   /* length */
1:      mov $1, %ecx                    /* take the UART lock */
        xor %eax, %eax
        lock cmpxchg %ecx, CB + CB_LOCK
        je 3f
2:      pause
        cmpl $0, CB + CB_LOCK
        jne 2b
        jmp 1b
3:      lodsb
        call uart_putc
        dec %r9
        jnz 3b
        movl $0, CB + CB_LOCK           /* release: a plain store is enough on x86 */
        ret

/* uart_putc: AL = byte.  Waits for the transmit holding register to be empty (LSR bit 5). */
uart_putc:
        mov %eax, %r8d
        mov $0x3fd, %edx
1:      in %dx, %al
        test $0x20, %al
        jnz 2f
        pause
        jmp 1b
2:      mov %r8d, %eax
        mov $0x3f8, %edx
        out %al, %dx
        ret

/* ---------------------------------------------------------------------------
 * Strings.
 */
str_wss:                .asciz "wss="
str_rate:               .asciz "rate="
str_pattern:            .asciz "pattern="
str_reboot:             .asciz "reboot="
msg_reboot:             .asciz "tern-guest: reboot"
str_random:             .asciz "random"
str_zero:               .asciz "zero"
str_compressible:       .asciz "compressible"
str_lines:              .asciz "lines="
str_ratio:              .asciz "ratio="
msg_start:              .asciz "tern-guest: start cpus "
msg_start_wss:          .asciz " wss "
msg_start_rate:         .asciz " MiB rate "
msg_start_pattern:      .asciz " MiB/s pattern "
msg_start_ratio:        .asciz " ratio "
msg_start_lines:        .asciz " lines "
msg_start_tsc:          .asciz " tsc "
msg_start_mhz:          .asciz " MHz"
msg_pass:               .asciz "tern-guest: pass "
msg_pass_rate:          .asciz " rate "
msg_pass_ok:            .asciz "MiB/s ok sweeps "
msg_pass_fail:          .asciz "MiB/s FAIL sweeps "
msg_pass_corrupt:       .asciz " corrupt "
msg_pass_clockback:     .asciz " clock-backwards "
msg_pass_gap:           .asciz " gap "
msg_pass_us:            .asciz " us"
msg_corrupt:            .asciz "tern-guest: CORRUPT page "
msg_clamped:            .asciz "tern-guest: wss clamped to "
msg_clamped2:           .asciz " MiB (working set must end below "
msg_clamped3:           .asciz " MiB)"
msg_pit_timeout:        .asciz "tern-guest: PIT calibration timed out, assuming tsc "
str_disk:               .asciz "disk="
str_disk_rate:          .asciz "disk-rate="
str_disk_io:            .asciz "disk-io="
str_virtio_mmio:        .asciz "virtio_mmio.device="
msg_pass_disk:          .asciz " disk "
msg_pass_dsweeps:       .asciz "MiB/s dsweeps "
msg_corrupt_block:      .asciz "tern-guest: CORRUPT block "
msg_disk_error:         .asciz "tern-guest: DISK-ERROR status "
msg_disk_error2:        .asciz " sector "
msg_disk:               .asciz "tern-guest: disk virtio-blk at 0x"
msg_disk_capacity:      .asciz " capacity "
msg_disk_wss:           .asciz " MiB wss "
msg_disk_io:            .asciz " MiB/s io "
msg_disk_kib:           .asciz " KiB"
msg_disk_filled:        .asciz "tern-guest: disk filled "
msg_mib:                .asciz " MiB"
msg_disk_clamped:       .asciz "tern-guest: disk clamped to "
msg_disk_clamped2:      .asciz " MiB (capacity "
msg_disk_clamped3:      .asciz " MiB, at most 8192 MiB)"
msg_disk_unusable:      .asciz "tern-guest: disk not usable: "
msg_no_device:          .asciz "no virtio-mmio block device (magic virt, version 2, device id 2)"
msg_no_reset:           .asciz "reset did not complete"
msg_no_version1:        .asciz "VIRTIO_F_VERSION_1 not offered"
msg_no_features_ok:     .asciz "FEATURES_OK refused"
msg_small_queue:        .asciz "QueueNumMax below 4"
msg_disk_dead:          .asciz "tern-guest: DISK-ERROR device-status "

        .balign 16, 0
image_end:

        .section .note.GNU-stack, "", @progbits
