/*
 * tern-guest.S: the built-in test guest of tern.
 *
 * A small bare-metal x86-64 program that dirties memory at a chosen rate and checks
 * that every byte it wrote is still there, so that tern's live migration (and
 * anything else that moves or snapshots guest memory) can be tested without a
 * Linux guest.  It prints what it does on COM1.  See guest/README.md.
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
 *   0x00200000  generation table: u32 per working-set page (up to 0x1000000)
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
 *
 * LINES PRINTED ON COM1 (each ends with "\n" alone)
 *   tern-guest: start cpus C wss W MiB rate R MiB/s pattern P lines L tsc T MHz
 *   tern-guest: pass N rate RMiB/s ok sweeps S gap G us
 *   tern-guest: pass N rate RMiB/s FAIL sweeps S corrupt K [clock-backwards B] gap G us
 *   tern-guest: CORRUPT page N
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
 *   line FAIL.
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
        .equ CB_PERCPU,         0x100           /* one cache line per CPU: */
        .equ PC_WRITTEN,        0x00            /*   pages rewritten (paced) */
        .equ PC_SWEEPS,         0x08            /*   complete verification sweeps */
        .equ PC_MAXGAP,         0x10            /*   largest TSC step between two rounds since the last pass line */
        .equ PC_SIZE,           64

        /* PIT channel 2 at 1193182 Hz; 59659 ticks = 50 ms. */
        .equ PIT_HZ,            1193182
        .equ PIT_COUNT,         59659

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
        .equ FRAME_SIZE,        0x90

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
        cmp %rax, CB + CB_RATE
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

7:      lea str_pattern(%rip), %rdi
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
7:      cmpb $' ', (%rsi)               /* nothing else may follow */
        ja 6f
        mov $1, %edx
        ret
6:      xor %edx, %edx
        ret

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
        dec %r12d
        jnz .Lcal_try

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

        /* Wait until every CPU has filled its share, so the pass lines start together. */
6:      lock incq CB + CB_FILLED
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

8:      test %r12, %r12                 /* CPU 0 reports once a second */
        jnz 9f
        cmp F_NEXT(%rbp), %r14
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

        /* MiB/s = pages * tsc_hz / (ticks * 256), rounded to nearest */
        mov %r8, %rax
        sub F_LASTW(%rbp), %rax
        mov %r8, F_LASTW(%rbp)
        mulq CB + CB_TSC_HZ
        mov %r14, %rcx
        sub F_LASTT(%rbp), %rcx
        shl $7, %rcx                    /* half the divisor */
        add %rcx, %rax
        adc $0, %rdx
        shl $1, %rcx
        div %rcx
        mov %rax, %rbx
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
        jmp 5f
4:      lea msg_pass_fail(%rip), %rsi
        call put_str
        mov %r13, %rax
        call put_dec
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
 * report_corrupt: RDI = page index.  Counts it and prints
 * "tern-guest: CORRUPT page N" for the first MAX_CORRUPT_LINES.
 */
report_corrupt:
        push %rbx
        mov %rdi, %rbx
        mov $1, %eax
        lock xadd %rax, CB + CB_CORRUPT
        cmp $MAX_CORRUPT_LINES, %rax
        jae 1f
        sub $LINE_BUF, %rsp
        mov %rsp, %rdi
        lea msg_corrupt(%rip), %rsi
        call put_str
        mov %rbx, %rax
        call put_dec
        mov %rsp, %rsi
        call send_line
        add $LINE_BUF, %rsp
1:      pop %rbx
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

/* put_dec: appends RAX in decimal to the buffer at RDI (advanced). */
put_dec:
        sub $32, %rsp                   /* digits are produced backwards into here */
        lea 32(%rsp), %rsi
        mov $10, %ecx
1:      xor %edx, %edx
        div %rcx
        add $'0', %dl
        dec %rsi
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

        .balign 16, 0
image_end:

        .section .note.GNU-stack, "", @progbits
